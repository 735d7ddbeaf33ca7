/// What a greedy generation produced and how long it took.
public struct Generation {
    public var promptTokens: [Int]
    /// The argmax of each step's logits: step 0 from the prompt's last position, step i from
    /// the token fed at step i.
    public var tokens: [Int]
    /// Logits of every step, [steps][vocab], when asked for.
    public var logits: [[Float]]
    /// Hidden states after every layer for every position processed (prompt, then each fed
    /// token), [layer][positions * hidden], when asked for.
    public var hidden: [[Float]]
    public var prefillSeconds: Double
    public var decodeSeconds: Double

    /// Decode throughput: the tokens produced after the prompt's, per second of decoding.
    public var decodeTokensPerSecond: Double? {
        tokens.count > 1 && decodeSeconds > 0 ? Double(tokens.count - 1) / decodeSeconds : nil
    }
}

/// Greedy decoding: prefill the prompt in one forward pass, then feed one token per step.
/// With `forced`, step i feeds forced[i-1] instead of the model's own previous token
/// (teacher forcing), so the logits of two implementations stay comparable after their
/// greedy choices part. The cache is allocated once, for prompt + maxNew positions.
public func generateGreedy(
    model: any CausalLM, prompt: [Int], maxNew: Int, forced: [Int]? = nil,
    keepLogits: Bool = false, keepHidden: Bool = false
) throws -> Generation {
    guard !prompt.isEmpty else { throw LMPortError("--tokens: the prompt needs at least one token") }
    guard maxNew >= 1 else { throw LMPortError("--max-new: expected >= 1, got \(maxNew)") }
    if let forced, forced.count < maxNew - 1 {
        throw LMPortError("--force: \(forced.count) tokens given, \(maxNew - 1) needed for \(maxNew) steps")
    }
    let cache = model.makeCache(capacity: prompt.count + maxNew - 1)
    let recorder = keepHidden ? HiddenRecorder(layers: model.config.layers) : nil
    var result = Generation(
        promptTokens: prompt, tokens: [], logits: [], hidden: [], prefillSeconds: 0,
        decodeSeconds: 0)
    let clock = ContinuousClock()

    func take(_ logits: [Float]) {
        let next = logits.withUnsafeBufferPointer { argmax($0.baseAddress!, count: $0.count) }
        result.tokens.append(next)
        if keepLogits { result.logits.append(logits) }
    }

    let prefillStart = clock.now
    take(try model.forward(prompt, cache: cache, recorder: recorder))
    result.prefillSeconds = seconds(clock.now - prefillStart)

    let decodeStart = clock.now
    for step in 1..<max(maxNew, 1) {
        let input = forced?[step - 1] ?? result.tokens[step - 1]
        take(try model.forward([input], cache: cache, recorder: recorder))
    }
    result.decodeSeconds = seconds(clock.now - decodeStart)
    result.hidden = recorder?.layers ?? []
    return result
}

func seconds(_ d: Duration) -> Double {
    let parts = d.components
    return Double(parts.seconds) + Double(parts.attoseconds) * 1e-18
}
