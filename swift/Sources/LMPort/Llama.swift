/// Llama (Touvron et al., 2023) as transformers' LlamaForCausalLM: pre-norm decoder layers
///   x = x + attention(rmsnorm(x));  x = x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))
/// with RoPE on every head dimension and grouped-query attention. Tensor names are
/// transformers' (model.layers.N.self_attn.q_proj.weight, ...).
public final class Llama: CausalLM {
    struct Layer {
        let inputNorm: Tensor  // input_layernorm.weight
        let attention: SelfAttention
        let postAttentionNorm: Tensor  // post_attention_layernorm.weight
        let gate: Linear
        let up: Linear
        let down: Linear
    }

    public let config: ModelConfig
    let embedding: Tensor  // model.embed_tokens.weight [vocab, hidden]
    let layers: [Layer]
    let finalNorm: Tensor  // model.norm.weight
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
                q: try Linear(store, p + "self_attn.q_proj", in: d, out: qDim, bias: c.attentionBias),
                k: try Linear(store, p + "self_attn.k_proj", in: d, out: kvDim, bias: c.attentionBias),
                v: try Linear(store, p + "self_attn.v_proj", in: d, out: kvDim, bias: c.attentionBias),
                o: try Linear(store, p + "self_attn.o_proj", in: qDim, out: d, bias: c.attentionBias),
                heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, rotary: rotary)
            return Layer(
                inputNorm: try store.tensor(p + "input_layernorm.weight", shape: [d]),
                attention: attention,
                postAttentionNorm: try store.tensor(p + "post_attention_layernorm.weight", shape: [d]),
                gate: try Linear(store, p + "mlp.gate_proj", in: d, out: c.intermediateSize, bias: c.mlpBias),
                up: try Linear(store, p + "mlp.up_proj", in: d, out: c.intermediateSize, bias: c.mlpBias),
                down: try Linear(store, p + "mlp.down_proj", in: c.intermediateSize, out: d, bias: c.mlpBias))
        }
        finalNorm = try store.tensor("model.norm.weight", shape: [d])
        if store.contains("lm_head.weight") {
            lmHead = try Linear(store, "lm_head", in: d, out: c.vocabSize, bias: false)
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
            // attention sub-block
            for t in 0..<n {
                rmsNorm(
                    ws.x.data + t * d, weight: layer.inputNorm.data, eps: c.normEps, count: d,
                    into: ws.normed.data + t * d)
            }
            layer.attention(layer: i, cache: cache, ws: ws)
            for j in 0..<(n * d) { ws.x.data[j] += ws.projected.data[j] }
            // SwiGLU MLP sub-block
            for t in 0..<n {
                rmsNorm(
                    ws.x.data + t * d, weight: layer.postAttentionNorm.data, eps: c.normEps,
                    count: d, into: ws.normed.data + t * d)
            }
            layer.gate(ws.normed.data, tokens: n, into: ws.mlpA.data)
            layer.up(ws.normed.data, tokens: n, into: ws.mlpB.data)
            for j in 0..<(n * c.intermediateSize) {
                ws.mlpA.data[j] = silu(ws.mlpA.data[j]) * ws.mlpB.data[j]
            }
            layer.down(ws.mlpA.data, tokens: n, into: ws.mlpOut.data)
            for j in 0..<(n * d) { ws.x.data[j] += ws.mlpOut.data[j] }
            recorder?.record(layer: i, ws.x.data, count: n * d)
        }
        cache.advance(n)
        rmsNorm(
            ws.x.data + (n - 1) * d, weight: finalNorm.data, eps: c.normEps, count: d,
            into: ws.last.data)
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
