/// Phi-2 (Microsoft, 2023) as transformers' PhiForCausalLM: a parallel block, where attention
/// and MLP read the same LayerNorm output and add to the residual together,
///   h = layernorm(x);  x = attention(h) + fc2(gelu(fc1(h))) + x
/// with biases everywhere, RoPE on only the first rotaryDim dimensions of each head
/// (partial_rotary_factor), a final LayerNorm and an lm_head with bias.
public final class Phi: CausalLM {
    struct Layer {
        let normWeight: Tensor  // input_layernorm.weight
        let normBias: Tensor  // input_layernorm.bias
        let attention: SelfAttention
        let fc1: Linear
        let fc2: Linear
    }

    public let config: ModelConfig
    let embedding: Tensor
    let layers: [Layer]
    let finalNormWeight: Tensor
    let finalNormBias: Tensor
    let lmHead: Linear
    private var workspace: Workspace?

    init(config c: ModelConfig, store: WeightStore) throws {
        config = c
        let d = c.hiddenSize
        embedding = try store.tensor("model.embed_tokens.weight", shape: [c.vocabSize, d])
        let rotary = Rotary(rotaryDim: c.rotaryDim, theta: c.ropeTheta)
        layers = try (0..<c.layers).map { i in
            let p = "model.layers.\(i)."
            let qDim = c.heads * c.headDim
            let kvDim = c.kvHeads * c.headDim
            let attention = SelfAttention(
                q: try Linear(store, p + "self_attn.q_proj", in: d, out: qDim, bias: true),
                k: try Linear(store, p + "self_attn.k_proj", in: d, out: kvDim, bias: true),
                v: try Linear(store, p + "self_attn.v_proj", in: d, out: kvDim, bias: true),
                o: try Linear(store, p + "self_attn.dense", in: qDim, out: d, bias: true),
                heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, rotary: rotary)
            return Layer(
                normWeight: try store.tensor(p + "input_layernorm.weight", shape: [d]),
                normBias: try store.tensor(p + "input_layernorm.bias", shape: [d]),
                attention: attention,
                fc1: try Linear(store, p + "mlp.fc1", in: d, out: c.intermediateSize, bias: true),
                fc2: try Linear(store, p + "mlp.fc2", in: c.intermediateSize, out: d, bias: true))
        }
        finalNormWeight = try store.tensor("model.final_layernorm.weight", shape: [d])
        finalNormBias = try store.tensor("model.final_layernorm.bias", shape: [d])
        if store.contains("lm_head.weight") {
            lmHead = try Linear(
                store, "lm_head", in: d, out: c.vocabSize, bias: store.contains("lm_head.bias"))
        } else if c.tieWordEmbeddings {
            lmHead = Linear(weight: embedding, bias: nil)
        } else {
            throw LMPortError(
                "\(store.directory.path): no lm_head.weight and tie_word_embeddings is false")
        }
    }

    public func forward(_ tokens: [Int], cache: KVCache, recorder: HiddenRecorder?) throws
        -> [Float]
    {
        guard !tokens.isEmpty else { throw LMPortError("forward needs at least one token") }
        try cache.reserve(tokens.count)
        let ws = workspaceFor(tokens: tokens.count, capacity: cache.capacity)
        let c = config
        let d = c.hiddenSize
        let n = tokens.count
        try embed(tokens, table: embedding, config: c, into: ws.x.data)
        for (i, layer) in layers.enumerated() {
            for t in 0..<n {
                layerNorm(
                    ws.x.data + t * d, weight: layer.normWeight.data, bias: layer.normBias.data,
                    eps: c.normEps, count: d, into: ws.normed.data + t * d)
            }
            layer.attention(layer: i, cache: cache, ws: ws)
            layer.fc1(ws.normed.data, tokens: n, into: ws.mlpA.data)
            for j in 0..<(n * c.intermediateSize) { ws.mlpA.data[j] = geluTanh(ws.mlpA.data[j]) }
            layer.fc2(ws.mlpA.data, tokens: n, into: ws.mlpOut.data)
            // transformers' order: (attention + mlp) + residual
            for j in 0..<(n * d) {
                ws.x.data[j] = (ws.projected.data[j] + ws.mlpOut.data[j]) + ws.x.data[j]
            }
            recorder?.record(layer: i, ws.x.data, count: n * d)
        }
        cache.advance(n)
        layerNorm(
            ws.x.data + (n - 1) * d, weight: finalNormWeight.data, bias: finalNormBias.data,
            eps: c.normEps, count: d, into: ws.last.data)
        var logits = [Float](repeating: 0, count: c.vocabSize)
        logits.withUnsafeMutableBufferPointer { lmHead(ws.last.data, tokens: 1, into: $0.baseAddress!) }
        return logits
    }

    private func workspaceFor(tokens: Int, capacity: Int) -> Workspace {
        if let ws = workspace, ws.tokens == tokens, ws.scores.count == capacity { return ws }
        let ws = Workspace(config: config, tokens: tokens, capacity: capacity)
        workspace = ws
        return ws
    }
}
