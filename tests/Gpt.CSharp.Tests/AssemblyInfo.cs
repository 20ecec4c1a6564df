using Xunit;

// Torch's global generator is process-wide: a training run seeds it and draws dropout from it, and other tests draw
// from it too (layer initialisation, torch.randint). Runs are reproducible only when nothing else draws meanwhile,
// so the test classes run one after another.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
