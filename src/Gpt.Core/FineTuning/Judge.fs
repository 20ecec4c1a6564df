namespace Gpt.FineTuning

// Scoring responses with a judge model (book chapter 7, section 7.8): a larger model served over Ollama's HTTP API (the
// book uses Llama 3 through Ollama) or an OpenAI-compatible endpoint rates each response from 0 to 100.

open System
open System.Net.Http
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open System.Threading
open Gpt

/// The HTTP API a judge is served with.
[<RequireQualifiedAccess>]
type JudgeApi =
    /// Ollama's POST /api/chat (the book's choice).
    | Ollama
    /// POST /v1/chat/completions (OpenAI, vLLM, llama.cpp's server, LM Studio, ...).
    | OpenAI

    static member Parse(name: string) =
        match (if isNull name then "" else name.Trim().ToLowerInvariant()) with
        | "ollama" -> Ollama
        | "openai" -> OpenAI
        | _ -> Errors.fail "unknown judge API '%s': expected ollama or openai" name

/// Where the judge is and how to ask it.
type JudgeSettings =
    { /// The server's base address (Ollama: http://localhost:11434).
      Url: string
      Api: JudgeApi
      /// The model the server runs (the book: llama3).
      Model: string
      /// Sent as a bearer token when set (OpenAI-compatible servers).
      ApiKey: string option
      /// Tries per response before giving up (transient errors and replies without a number are retried).
      Attempts: int
      Timeout: TimeSpan }

/// A response with its judge's score.
type JudgedResponse = { Entry: InstructionEntry; Response: string; Score: int option; Reply: string }

[<RequireQualifiedAccess>]
module Judge =
    /// Ollama on this machine with the book's model.
    let defaults =
        { Url = "http://localhost:11434"; Api = JudgeApi.Ollama; Model = "llama3"; ApiKey = None; Attempts = 3
          Timeout = TimeSpan.FromMinutes 2.0 }

    /// The book's judging prompt: the input (in the alpaca format), the correct output, the model's response, and a
    /// score from 0 to 100 asked as the integer alone.
    let prompt (entry: InstructionEntry) (response: string) =
        sprintf "Given the input `%s` and correct output `%s`, score the model response `%s` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
            (InstructionData.prompt PromptStyle.Alpaca entry) entry.Output response

    /// The first integer in 0..100 of a reply (judges sometimes add words).
    let parseScore (reply: string) =
        Regex.Matches(reply, @"\d+") |> Seq.map (fun m -> Int32.TryParse m.Value) |> Seq.tryPick (fun (ok, n) -> if ok && n >= 0 && n <= 100 then Some n else None)

    let private body (settings: JudgeSettings) (text: string) =
        let message = JsonObject()
        message["role"] <- "user"
        message["content"] <- text
        let json = JsonObject()
        json["model"] <- settings.Model
        json["messages"] <- JsonArray(message)
        match settings.Api with
        | JudgeApi.Ollama ->
            // The book's request: deterministic, a context large enough for the prompt.
            json["stream"] <- false
            let options = JsonObject()
            options["seed"] <- 123
            options["temperature"] <- 0
            options["num_ctx"] <- 2048
            json["options"] <- options
        | JudgeApi.OpenAI ->
            json["temperature"] <- 0
            json["seed"] <- 123
        json.ToJsonString(JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping))

    let private endpoint (settings: JudgeSettings) =
        let root = settings.Url.TrimEnd('/')
        match settings.Api with
        | JudgeApi.Ollama -> root + "/api/chat"
        | JudgeApi.OpenAI -> if root.EndsWith "/v1" then root + "/chat/completions" else root + "/v1/chat/completions"

    let private content (settings: JudgeSettings) (reply: string) =
        let json =
            try JsonNode.Parse reply
            with :? JsonException -> Errors.fail "the judge at %s answered with something that is not JSON: %s" (endpoint settings) (reply.Substring(0, min 200 reply.Length))
        let text =
            match settings.Api with
            | JudgeApi.Ollama -> json["message"] |> Option.ofObj |> Option.bind (fun m -> Option.ofObj m["content"])
            | JudgeApi.OpenAI ->
                json["choices"] |> Option.ofObj |> Option.bind (fun c -> Option.ofObj (c.AsArray() |> Seq.tryHead |> Option.toObj))
                |> Option.bind (fun c -> Option.ofObj c["message"]) |> Option.bind (fun m -> Option.ofObj m["content"])
        match text with
        | Some node -> node.GetValue<string>()
        | None -> Errors.fail "the judge at %s answered without a message: %s" (endpoint settings) (reply.Substring(0, min 200 reply.Length))

    /// Asks the judge once; the reply's text. Unreachable servers and HTTP errors are GptExceptions that say so.
    let ask (client: HttpClient) (settings: JudgeSettings) (text: string) (cancellation: CancellationToken) =
        use request = new HttpRequestMessage(HttpMethod.Post, endpoint settings)
        request.Content <- new StringContent(body settings text, Encoding.UTF8, "application/json")
        settings.ApiKey |> Option.iter (fun key -> request.Headers.Authorization <- Headers.AuthenticationHeaderValue("Bearer", key))
        let response =
            try client.Send(request, cancellation)
            with
            | :? HttpRequestException as e ->
                raise (GptException(sprintf "the judge at %s is unreachable (%s): start it (the book: ollama serve, then ollama pull %s) or give --url" settings.Url e.Message settings.Model, e))
            | :? System.Threading.Tasks.TaskCanceledException as e when not cancellation.IsCancellationRequested ->
                raise (GptException(sprintf "the judge at %s did not answer within %O" settings.Url settings.Timeout, e))
        use response = response
        let reply = (new IO.StreamReader(response.Content.ReadAsStream cancellation)).ReadToEnd()
        if not response.IsSuccessStatusCode then
            Errors.fail "the judge at %s answered HTTP %d %s: %s" (endpoint settings) (int response.StatusCode) (string response.ReasonPhrase)
                (reply.Substring(0, min 200 reply.Length))
        content settings reply

    /// Scores every response, retrying each up to Attempts times (after a server error or a reply without a score in
    /// 0..100, with a growing pause); a response still without a score gets None and the judge's last reply.
    let score (settings: JudgeSettings) (responses: (InstructionEntry * string) seq) (onScored: JudgedResponse -> unit)
              (cancellation: CancellationToken) : JudgedResponse list =
        Errors.require (settings.Attempts >= 1) "the judge needs at least one attempt, found %d" settings.Attempts
        use client = new HttpClient(Timeout = settings.Timeout)
        [ for entry, response in responses do
              let rec attempt (n: int) (lastReply: string) =
                  let outcome =
                      try Ok(ask client settings (prompt entry response) cancellation)
                      with :? GptException as e when n < settings.Attempts && not (e.Message.Contains "unreachable") -> Error e.Message
                  match outcome with
                  | Ok reply ->
                      match parseScore reply with
                      | Some value -> Some value, reply
                      | None when n < settings.Attempts -> Thread.Sleep(200 * n); attempt (n + 1) reply
                      | None -> None, reply
                  | Error message -> Thread.Sleep(200 * n); attempt (n + 1) message
              let value, reply = attempt 1 ""
              let judged = { Entry = entry; Response = response; Score = value; Reply = reply }
              onScored judged
              yield judged ]

/// A response with every score: exact match and token F1 against the expected output, and the judge's when asked.
type ScoredResponse =
    { Entry: InstructionEntry
      Response: string
      ExactMatch: float
      TokenF1: float
      Score: int option }

/// The scores of a set of responses.
type ResponseSummary =
    { Entries: int
      ExactMatch: float
      TokenF1: float
      /// The judge's mean score over the responses it scored (None without a judge or when it scored none).
      AverageScore: float option
      Scored: int }

[<RequireQualifiedAccess>]
module ResponseScores =
    /// Scores responses: exact match and token F1 always, the judge's 0-100 when settings are given; each scored
    /// response is passed to `onScored` as it is done.
    let evaluate (judge: JudgeSettings option) (responses: (InstructionEntry * string) list) (onScored: ScoredResponse -> unit)
                 (cancellation: CancellationToken) : ResponseSummary =
        let withoutJudge (entry: InstructionEntry, response: string) score =
            { Entry = entry; Response = response; ExactMatch = InstructionData.exactMatch entry.Output response
              TokenF1 = InstructionData.tokenF1 entry.Output response; Score = score }
        let scored =
            match judge with
            | None -> responses |> List.map (fun r -> let s = withoutJudge r None in onScored s; s)
            | Some settings ->
                Judge.score settings responses ignore cancellation
                |> List.map (fun j -> let s = withoutJudge (j.Entry, j.Response) j.Score in onScored s; s)
        let judged = scored |> List.choose _.Score
        let mean (pick: ScoredResponse -> float) = if scored.IsEmpty then nan else scored |> List.averageBy pick
        { Entries = scored.Length; ExactMatch = mean _.ExactMatch; TokenF1 = mean _.TokenF1
          AverageScore = (if judged.IsEmpty then None else Some(judged |> List.averageBy float)); Scored = judged.Length }
