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
    let q: Linear
    let k: Linear
    let v: Linear
    let o: Linear
    let heads: Int
    let kvHeads: Int
    let headDim: Int
    let rotary: Rotary

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

/// Shared checks and the embedding lookup of both architectures.
func embed(
    _ tokens: [Int], table: Tensor, config: ModelConfig, into x: UnsafeMutablePointer<Float>
) throws {
    let d = config.hiddenSize
    for (t, token) in tokens.enumerated() {
        guard token >= 0, token < config.vocabSize else {
            throw LMPortError("token id \(token) outside the vocabulary 0..<\(config.vocabSize)")
        }
        (x + t * d).update(from: table.data + token * d, count: d)
    }
}

/// Loads the model in `directory` (config.json + safetensors), choosing the architecture
/// from config.json.
public func loadModel(directory: URL) throws -> any CausalLM {
    let config = try ModelConfig.load(directory: directory)
    let store = try WeightStore(directory: directory)
    switch config.architecture {
    case .llama: return try Llama(config: config, store: store)
    case .phi: return try Phi(config: config, store: store)
    }
}
