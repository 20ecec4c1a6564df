using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>Models from every source through the façade and the CLI: the book's .pth, OpenAI's checkpoint, Hugging Face
/// ids from a stub hub on 127.0.0.1 (tests/fixtures/weights, made by reference/make_weight_forms.py).</summary>
public class WeightSourceTests
{
    private static string Forms(string relative) => Path.Combine(Fixtures.Root, "tests", "fixtures", "weights", relative);

    private static readonly int[][] Ids = [[5, 17, 511, 300, 2, 99, 128, 7], [0, 1, 2, 3, 500, 400, 300, 200]];

    private static void SameLogits(GptModel actual, GptModel expected)
    {
        var a = actual.Logits(Ids);
        var e = expected.Logits(Ids);
        var max = a.Zip(e).SelectMany(p => p.First.Zip(p.Second)).SelectMany(p => p.First.Zip(p.Second)).Max(p => Math.Abs(p.First - p.Second));
        Assert.True(max <= 1e-6, $"max |difference| {max}");
    }

    [Fact]
    public void TheBooksPthAndOpenAIsCheckpointLoadToTheOriginalsLogits()
    {
        using var original = GptModel.Load(Forms("hf"));
        var configuration = GptModel.ReadConfiguration(Forms("hf/config.json"));
        using (var book = GptModel.Load(Forms("book/model-fused-bias.pth"), configuration))
            SameLogits(book, original);
        using (var openai = GptModel.Load(Forms("openai")))
            SameLogits(openai, original);
        Assert.Equal("pytorch-state-dict", GptModel.SourceKind(Forms("book/model-fused-bias.pth")));
        Assert.Equal("openai-checkpoint", GptModel.SourceKind(Forms("openai")));
        Assert.Equal("hugging-face-hub", GptModel.SourceKind("openai-community/gpt2"));
        var error = Assert.Throws<GptException>(() => GptModel.Load(Forms("book/model-fused-bias.pth")));
        Assert.Contains("number of attention heads", error.Message);
    }

    [Fact]
    public void ConvertThenLogitsThroughTheCli()
    {
        using var dir = new Fixtures.TempDir();
        var (code, output, error) = Cli.Run(null, "convert", "--from", Forms("book/model-separate-nobias.pth"), "--to", dir.File("book"),
            "--config", Forms("hf/config.json"), "--format", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output))
        {
            Assert.Equal("pytorch-state-dict", json.RootElement.GetProperty("kind").GetString());
            Assert.False(json.RootElement.GetProperty("config").GetProperty("qkv_bias").GetBoolean());
        }
        var (openaiCode, _, openaiError) = Cli.Run(null, "convert", "--from", Forms("openai"), "--to", dir.File("openai"));
        Assert.True(openaiCode == 0, openaiError);
        string Logits(string model)
        {
            var (c, o, e) = Cli.Run(null, "logits", "--model", model, "--ids", "5,17,511,300");
            Assert.True(c == 0, e);
            return o;
        }
        Assert.Equal(Logits(Forms("hf-nobias")), Logits(dir.File("book")));
        Assert.Equal(Logits(Forms("hf")), Logits(dir.File("openai")));
        Assert.Equal(Logits(Forms("hf")), Logits(Forms("openai")));

        // --model takes a .pth directly when its configuration is beside it.
        Directory.CreateDirectory(dir.File("pth"));
        File.Copy(Forms("book/model-fused-bias.pth"), dir.File("pth/model.pth"));
        File.Copy(Forms("hf/config.json"), dir.File("pth/config.json"));
        Assert.Equal(Logits(Forms("hf")), Logits(dir.File("pth/model.pth")));

        var (badCode, _, badError) = Cli.Run(null, "convert", "--from", Forms("book/model-fused-bias.pth"), "--to", dir.File("x"), "--config", "gpt2-small");
        Assert.Equal(1, badCode);
        Assert.Contains("tok_emb.weight' has shape [512, 32], expected [50257, 768]", badError);
    }

    [Fact]
    public void HubIdsThroughTheEnvironmentTheCacheAndOffline()
    {
        using var dir = new Fixtures.TempDir();
        using var hub = new StubHub("user/tiny", Forms("hf"));
        var saved = new[] { "HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN" }.ToDictionary(n => n, Environment.GetEnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable("HF_ENDPOINT", hub.Endpoint);
            Environment.SetEnvironmentVariable("HF_HOME", dir.File("hf-home"));
            Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", null);
            Environment.SetEnvironmentVariable("HF_HUB_CACHE", null);
            Environment.SetEnvironmentVariable("HF_TOKEN", "hf_test");
            var reports = new List<ModelDownloadProgress>();
            using (var model = GptModel.FromPretrained("user/tiny", new SynchronousProgress(reports.Add)))
            using (var original = GptModel.Load(Forms("hf")))
                SameLogits(model, original);
            Assert.Contains(reports, r => r.FileName == "model.safetensors" && r.Completed && r.BytesReceived == r.TotalBytes);
            Assert.True(File.Exists(Path.Combine(dir.File("hf-home"), "hub", "models--user--tiny", "refs", "main")), "the cache under HF_HOME/hub");
            Assert.Contains("Bearer hf_test", hub.Authorizations);

            var (code, _, error) = Cli.Run(null, "info", "--model", "user/tiny", "--format", "json");
            Assert.True(code == 0, error);

            Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1");
            var requests = hub.Requests;
            var (offlineCode, _, offlineError) = Cli.Run(null, "info", "--model", "user/tiny");
            Assert.True(offlineCode == 0, offlineError);
            Assert.Equal(requests, hub.Requests);
            var (missingCode, _, missingError) = Cli.Run(null, "info", "--model", "user/other");
            Assert.Equal(1, missingCode);
            Assert.Contains("HF_HUB_OFFLINE", missingError);

            Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", null);
            var (downloadCode, _, downloadError) = Cli.Run(null, "convert", "--from", "user/tiny@main", "--to", dir.File("copy"));
            Assert.True(downloadCode == 0, downloadError);
            var (notFoundCode, _, notFoundError) = Cli.Run(null, "generate", "--model", "user/missing", "--prompt", "Hi");
            Assert.Equal(1, notFoundCode);
            Assert.Contains("was not found on the Hugging Face hub", notFoundError);
        }
        finally
        {
            foreach (var (name, value) in saved) Environment.SetEnvironmentVariable(name, value);
        }
    }

    /// <summary>IProgress that reports on the calling thread (Progress&lt;T&gt; would post to the thread pool).</summary>
    private sealed class SynchronousProgress(Action<ModelDownloadProgress> report) : IProgress<ModelDownloadProgress>
    {
        public void Report(ModelDownloadProgress value)
        {
            lock (this) report(value);
        }
    }

    /// <summary>The hub's resolve endpoint for one repository on 127.0.0.1, serving a folder's files (git-blob ETags for
    /// config.json, a redirect with X-Linked-Etag for the weights, as huggingface.co does).</summary>
    private sealed class StubHub : IDisposable
    {
        private const string Commit = "89abcdef0123456789abcdef0123456789abcdef";
        private readonly HttpListener _listener = new();
        private readonly string _repo;
        private readonly string _folder;
        private readonly List<string> _authorizations = [];
        private int _requests;

        public StubHub(string repo, string folder)
        {
            _repo = repo;
            _folder = folder;
            var probe = new TcpListener(IPAddress.Loopback, 0);
            probe.Start();
            var port = ((IPEndPoint)probe.LocalEndpoint).Port;
            probe.Stop();
            Endpoint = $"http://127.0.0.1:{port}";
            _listener.Prefixes.Add(Endpoint + "/");
            _listener.Start();
            Task.Run(Serve);
        }

        public string Endpoint { get; }
        public int Requests => Volatile.Read(ref _requests);
        public IReadOnlyList<string> Authorizations { get { lock (_authorizations) return _authorizations.ToList(); } }

        private async Task Serve()
        {
            while (_listener.IsListening)
            {
                HttpListenerContext context;
                try { context = await _listener.GetContextAsync(); }
                catch (Exception) { return; }
                Interlocked.Increment(ref _requests);
                var (request, response) = (context.Request, context.Response);
                lock (_authorizations) _authorizations.Add(request.Headers["Authorization"] ?? "");
                var path = request.Url!.AbsolutePath;
                var prefix = $"/{_repo}/resolve/main/";
                var name = path.StartsWith(prefix) ? path[prefix.Length..] : path.StartsWith("/store/") ? path["/store/".Length..] : null;
                var file = name is null ? null : Path.Combine(_folder, name);
                if (file is null || !File.Exists(file))
                {
                    response.StatusCode = 404;
                    if (name is not null && path.StartsWith(prefix)) response.Headers["X-Error-Code"] = "EntryNotFound";
                }
                else
                {
                    var bytes = await File.ReadAllBytesAsync(file);
                    response.Headers["X-Repo-Commit"] = Commit;
                    if (path.StartsWith(prefix) && name!.EndsWith(".safetensors"))
                    {
                        response.StatusCode = 302;
                        response.Headers["Location"] = $"{Endpoint}/store/{name}";
                        response.Headers["X-Linked-Etag"] = $"\"{Convert.ToHexString(SHA256.HashData(bytes)).ToLowerInvariant()}\"";
                        response.Headers["X-Linked-Size"] = bytes.Length.ToString();
                    }
                    else
                    {
                        var blob = SHA1.HashData(Encoding.ASCII.GetBytes($"blob {bytes.Length}\0").Concat(bytes).ToArray());
                        response.Headers["ETag"] = $"\"{Convert.ToHexString(blob).ToLowerInvariant()}\"";
                        response.ContentLength64 = bytes.Length;
                        if (request.HttpMethod == "GET") await response.OutputStream.WriteAsync(bytes);
                    }
                }
                response.Close();
            }
        }

        public void Dispose()
        {
            _listener.Stop();
            _listener.Close();
        }
    }
}
