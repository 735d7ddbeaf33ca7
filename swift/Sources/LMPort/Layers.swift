import Foundation

/// y = x Wᵀ + b for `tokens` rows of x, with W in PyTorch's [out_features, in_features]
/// layout so checkpoints load without transposing. One token: gemv; several: gemm.
struct Linear {
    let weight: Tensor
    let bias: Tensor?
    var inFeatures: Int { weight.shape[1] }
    var outFeatures: Int { weight.shape[0] }

    init(_ store: WeightStore, _ name: String, in inFeatures: Int, out outFeatures: Int, bias: Bool)
        throws
    {
        weight = try store.tensor(name + ".weight", shape: [outFeatures, inFeatures])
        self.bias = bias ? try store.tensor(name + ".bias", shape: [outFeatures]) : nil
    }

    /// A linear layer sharing an existing weight (tied input/output embeddings).
    init(weight: Tensor, bias: Tensor?) {
        self.weight = weight
        self.bias = bias
    }

    func callAsFunction(
        _ x: UnsafePointer<Float>, tokens: Int, into y: UnsafeMutablePointer<Float>
    ) {
        let n = outFeatures
        if tokens == 1 {
            BLAS.gemv(weight.data, rows: n, cols: inFeatures, lda: inFeatures, x, y)
        } else {
            BLAS.gemmWeightsTransposed(x, m: tokens, k: inFeatures, weight.data, n: n, y)
        }
        if let bias {
            for t in 0..<tokens {
                let row = y + t * n
                for i in 0..<n { row[i] += bias.data[i] }
            }
        }
    }
}

/// Scratch buffers for one forward call of `tokens` positions, allocated once per distinct
/// token count (decode always reuses the one-token set).
final class Workspace {
    let tokens: Int
    let x: Tensor  // residual stream [T, hidden]
    let normed: Tensor  // normalised input of a sub-block [T, hidden]
    let q: Tensor  // [T, heads * headDim]
    let k: Tensor  // [T, kvHeads * headDim]
    let v: Tensor  // [T, kvHeads * headDim]
    let attention: Tensor  // per-head attention outputs, concatenated [T, heads * headDim]
    let projected: Tensor  // attention output projection [T, hidden]
    let mlpA: Tensor  // [T, intermediate]
    let mlpB: Tensor  // [T, intermediate]
    let mlpOut: Tensor  // [T, hidden]
    let scores: Tensor  // attention scores of one head over the cache [capacity]
    let cos: Tensor
    let sin: Tensor
    let last: Tensor  // the final-normed last position [hidden]

    init(config c: ModelConfig, tokens: Int, capacity: Int) {
        self.tokens = tokens
        x = Tensor(shape: [tokens, c.hiddenSize])
        normed = Tensor(shape: [tokens, c.hiddenSize])
        q = Tensor(shape: [tokens, c.heads * c.headDim])
        k = Tensor(shape: [tokens, c.kvHeads * c.headDim])
        v = Tensor(shape: [tokens, c.kvHeads * c.headDim])
        attention = Tensor(shape: [tokens, c.heads * c.headDim])
        projected = Tensor(shape: [tokens, c.hiddenSize])
        mlpA = Tensor(shape: [tokens, c.intermediateSize])
        mlpB = Tensor(shape: [tokens, c.intermediateSize])
        mlpOut = Tensor(shape: [tokens, c.hiddenSize])
        scores = Tensor(shape: [capacity])
        cos = Tensor(shape: [max(c.rotaryDim / 2, 1)])
        sin = Tensor(shape: [max(c.rotaryDim / 2, 1)])
        last = Tensor(shape: [c.hiddenSize])
    }
}

/// Causal multi-head self-attention with grouped-query heads (Ainslie et al., 2023): query
/// head h reads key/value head h / (heads / kvHeads). Keys get RoPE before they enter the
/// cache, so cached keys are never rotated again.
struct SelfAttention {
    let q, k, v, o: Linear  // query, key, value and output projections
    let heads, kvHeads, headDim: Int
    let rotary: Rotary

    /// Layer `prefix`'s projections (prefix + "q_proj", ...): Llama names its output
    /// projection "o_proj", Phi "dense"; `bias` says whether all four carry a bias.
    init(
        _ store: WeightStore, prefix: String, config c: ModelConfig, output: String, bias: Bool,
        rotary: Rotary
    ) throws {
        let d = c.hiddenSize
        let qDim = c.heads * c.headDim
        let kvDim = c.kvHeads * c.headDim
        q = try Linear(store, prefix + "q_proj", in: d, out: qDim, bias: bias)
        k = try Linear(store, prefix + "k_proj", in: d, out: kvDim, bias: bias)
        v = try Linear(store, prefix + "v_proj", in: d, out: kvDim, bias: bias)
        o = try Linear(store, prefix + output, in: qDim, out: d, bias: bias)
        heads = c.heads
        kvHeads = c.kvHeads
        headDim = c.headDim
        self.rotary = rotary
    }

    /// Reads ws.normed [T, hidden], appends T keys/values to `cache` for `layer`, and writes
    /// the attention block's output (after the output projection) to ws.projected.
    func callAsFunction(layer: Int, cache: KVCache, ws: Workspace) {
        let tokens = ws.tokens
        let qDim = heads * headDim
        let kvDim = kvHeads * headDim
        q(ws.normed.data, tokens: tokens, into: ws.q.data)
        k(ws.normed.data, tokens: tokens, into: ws.k.data)
        v(ws.normed.data, tokens: tokens, into: ws.v.data)
        for t in 0..<tokens {
            rotary.angles(position: cache.length + t, cos: ws.cos.data, sin: ws.sin.data)
            rotary.apply(
                ws.q.data + t * qDim, heads: heads, headDim: headDim, cos: ws.cos.data,
                sin: ws.sin.data)
            rotary.apply(
                ws.k.data + t * kvDim, heads: kvHeads, headDim: headDim, cos: ws.cos.data,
                sin: ws.sin.data)
        }
        cache.write(layer: layer, keys: ws.k.data, values: ws.v.data, count: tokens)

        let scale = Float(1 / Double(headDim).squareRoot())
        let group = heads / kvHeads
        let keys = cache.keys[layer].data
        let values = cache.values[layer].data
        for t in 0..<tokens {
            let visible = cache.length + t + 1  // causal: positions 0...current
            for h in 0..<heads {
                let kvHead = h / group
                // scores[s] = scale * q · k_s over the cached positions of this kv head
                BLAS.gemv(
                    keys + kvHead * headDim, rows: visible, cols: headDim, lda: kvDim,
                    ws.q.data + t * qDim + h * headDim, ws.scores.data, alpha: scale)
                softmax(ws.scores.data, count: visible)
                // output = Σ_s softmax_s * v_s
                BLAS.gemvTransposed(
                    values + kvHead * headDim, rows: visible, cols: headDim, lda: kvDim,
                    ws.scores.data, ws.attention.data + t * qDim + h * headDim)
            }
        }
        o(ws.attention.data, tokens: tokens, into: ws.projected.data)
    }
}

/// Hidden states after each decoder layer, for every position processed, in order: what the
/// parity tests compare layer by layer to find where an error starts.
public final class HiddenRecorder {
    public private(set) var layers: [[Float]]

    public init(layers: Int) { self.layers = Array(repeating: [], count: layers) }

    func record(layer: Int, _ x: UnsafePointer<Float>, count: Int) {
        layers[layer].append(contentsOf: UnsafeBufferPointer(start: x, count: count))
    }
}

/// A decoder-only language model: feed tokens, get next-token logits.
public protocol CausalLM: AnyObject {
    var config: ModelConfig { get }
    /// Runs `tokens` at positions cache.length..., appends their keys and values to `cache`,
    /// and returns the logits of the last token. `recorder` (optional) receives the hidden
    /// state after every layer.
    func forward(_ tokens: [Int], cache: KVCache, recorder: HiddenRecorder?) throws -> [Float]
}

extension CausalLM {
    /// A cache for `capacity` positions (prompt + new tokens), allocated once.
    public func makeCache(capacity: Int) -> KVCache {
        KVCache(
            layers: config.layers, capacity: capacity, kvDim: config.kvHeads * config.headDim)
    }
}

/// A normalisation over the hidden dimension, one position at a time.
protocol Norm {
    /// Loads `name`.weight (and `name`.bias where the norm has one).
    init(_ store: WeightStore, _ name: String, config: ModelConfig) throws
    var width: Int { get }
    func callAsFunction(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>)
}

extension Norm {
    /// out[t] = norm(x[t]) for each of `tokens` positions.
    func rows(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, tokens: Int) {
        for t in 0..<tokens { self(x + t * width, into: out + t * width) }
    }
}

/// Llama's RMSNorm (see rmsNorm).
struct RMSNorm: Norm {
    let weight: Tensor
    let eps: Float
    var width: Int { weight.count }

    init(_ store: WeightStore, _ name: String, config c: ModelConfig) throws {
        weight = try store.tensor(name + ".weight", shape: [c.hiddenSize])
        eps = c.normEps
    }

    func callAsFunction(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
        rmsNorm(x, weight: weight.data, eps: eps, count: width, into: out)
    }
}

/// Phi's LayerNorm (see layerNorm).
struct LayerNorm: Norm {
    let weight: Tensor
    let bias: Tensor
    let eps: Float
    var width: Int { weight.count }

    init(_ store: WeightStore, _ name: String, config c: ModelConfig) throws {
        weight = try store.tensor(name + ".weight", shape: [c.hiddenSize])
        bias = try store.tensor(name + ".bias", shape: [c.hiddenSize])
        eps = c.normEps
    }

    func callAsFunction(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
        layerNorm(x, weight: weight.data, bias: bias.data, eps: eps, count: width, into: out)
    }
}

/// What Llama and Phi do differently: a decoder layer (its tensors and its arithmetic), the
/// kind and name of the final norm, and whether lm_head has a bias. DecoderModel does the
/// rest (embedding, the loop over layers, final norm, lm_head, workspace), the same for both.
protocol DecoderArchitecture {
    associatedtype Layer
    associatedtype FinalNorm: Norm
    /// The final norm's tensor name ("model.norm", "model.final_layernorm").
    static var finalNormName: String { get }
    /// Whether a stored lm_head.weight comes with an lm_head.bias.
    static func lmHeadBias(in store: WeightStore) -> Bool
    /// Loads the decoder layer whose tensors are named `prefix` + ... ("model.layers.N.").
    static func layer(
        _ store: WeightStore, prefix: String, config: ModelConfig, rotary: Rotary
    ) throws -> Layer
    /// Decoder layer `index` on the residual stream ws.x (ws.tokens positions), in place.
    static func apply(_ layer: Layer, index: Int, config: ModelConfig, cache: KVCache, ws: Workspace)
}

/// A decoder-only model of architecture `A`: the token embedding, the decoder layers, the
/// final norm, the output projection (a stored lm_head, or the embedding itself when tied)
/// and the scratch buffers of a forward pass.
final class DecoderModel<A: DecoderArchitecture>: CausalLM {
    let config: ModelConfig
    let embedding: Tensor  // model.embed_tokens.weight [vocab, hidden]
    let layers: [A.Layer]
    let finalNorm: A.FinalNorm
    let lmHead: Linear
    private var workspace: Workspace?

    init(config c: ModelConfig, store: WeightStore) throws {
        config = c
        embedding = try store.tensor("model.embed_tokens.weight", shape: [c.vocabSize, c.hiddenSize])
        let rotary = Rotary(rotaryDim: c.rotaryDim, theta: c.ropeTheta)
        layers = try (0..<c.layers).map { i in
            try A.layer(store, prefix: "model.layers.\(i).", config: c, rotary: rotary)
        }
        finalNorm = try A.FinalNorm(store, A.finalNormName, config: c)
        if store.contains("lm_head.weight") {
            lmHead = try Linear(
                store, "lm_head", in: c.hiddenSize, out: c.vocabSize, bias: A.lmHeadBias(in: store))
        } else if c.tieWordEmbeddings {
            lmHead = Linear(weight: embedding, bias: nil)
        } else {
            throw LMPortError(
                "\(store.directory.path): no lm_head.weight and tie_word_embeddings is false")
        }
    }

    /// Embeds `tokens` into ws.x, runs the decoder layers on it (`recorder` gets the residual
    /// stream after each), commits the new cache positions, and returns the logits
    /// lm_head(finalNorm(last position)).
    func forward(_ tokens: [Int], cache: KVCache, recorder: HiddenRecorder?) throws -> [Float] {
        guard !tokens.isEmpty else { throw LMPortError("forward needs at least one token") }
        try cache.reserve(tokens.count)
        let ws = workspaceFor(tokens: tokens.count, capacity: cache.capacity)
        let d = config.hiddenSize
        let n = tokens.count
        try embed(tokens, into: ws.x.data)
        for (i, layer) in layers.enumerated() {
            A.apply(layer, index: i, config: config, cache: cache, ws: ws)
            recorder?.record(layer: i, ws.x.data, count: n * d)
        }
        cache.advance(n)
        finalNorm(ws.x.data + (n - 1) * d, into: ws.last.data)
        var logits = [Float](repeating: 0, count: config.vocabSize)
        logits.withUnsafeMutableBufferPointer { lmHead(ws.last.data, tokens: 1, into: $0.baseAddress!) }
        return logits
    }

    /// The embedding rows of `tokens`, refusing ids outside the vocabulary.
    private func embed(_ tokens: [Int], into x: UnsafeMutablePointer<Float>) throws {
        let d = config.hiddenSize
        for (t, token) in tokens.enumerated() {
            guard token >= 0, token < config.vocabSize else {
                throw LMPortError("token id \(token) outside the vocabulary 0..<\(config.vocabSize)")
            }
            (x + t * d).update(from: embedding.data + token * d, count: d)
        }
    }

    private func workspaceFor(tokens: Int, capacity: Int) -> Workspace {
        if let ws = workspace, ws.tokens == tokens, ws.scores.count == capacity { return ws }
        let ws = Workspace(config: config, tokens: tokens, capacity: capacity)
        workspace = ws
        return ws
    }
}

/// Loads the model in `directory` (config.json + safetensors), choosing the architecture
/// from config.json.
public func loadModel(directory: URL) throws -> any CausalLM {
    let config = try ModelConfig.load(directory: directory)
    let store = try WeightStore(directory: directory)
    switch config.architecture {
    case .llama: return try DecoderModel<Llama>(config: config, store: store)
    case .phi: return try DecoderModel<Phi>(config: config, store: store)
    }
}
