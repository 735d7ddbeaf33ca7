/// Llama (Touvron et al., 2023) as transformers' LlamaForCausalLM: pre-norm decoder layers
///   x = x + attention(rmsnorm(x));  x = x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))
/// with RoPE on every head dimension and grouped-query attention, a final RMSNorm and an
/// lm_head without bias. Tensor names are transformers' (model.layers.N.self_attn.q_proj.weight,
/// ...). The embedding, the layer loop and lm_head are DecoderModel's.
enum Llama: DecoderArchitecture {
    struct Layer {
        let inputNorm: RMSNorm  // input_layernorm
        let attention: SelfAttention
        let postAttentionNorm: RMSNorm  // post_attention_layernorm
        let gate, up, down: Linear  // mlp.gate_proj, mlp.up_proj, mlp.down_proj
    }

    typealias FinalNorm = RMSNorm
    static let finalNormName = "model.norm"

    static func lmHeadBias(in store: WeightStore) -> Bool { false }

    static func layer(
        _ store: WeightStore, prefix p: String, config c: ModelConfig, rotary: Rotary
    ) throws -> Layer {
        let (d, ff) = (c.hiddenSize, c.intermediateSize)
        return Layer(
            inputNorm: try RMSNorm(store, p + "input_layernorm", config: c),
            attention: try SelfAttention(
                store, prefix: p + "self_attn.", config: c, output: "o_proj",
                bias: c.attentionBias, rotary: rotary),
            postAttentionNorm: try RMSNorm(store, p + "post_attention_layernorm", config: c),
            gate: try Linear(store, p + "mlp.gate_proj", in: d, out: ff, bias: c.mlpBias),
            up: try Linear(store, p + "mlp.up_proj", in: d, out: ff, bias: c.mlpBias),
            down: try Linear(store, p + "mlp.down_proj", in: ff, out: d, bias: c.mlpBias))
    }

    static func apply(
        _ layer: Layer, index: Int, config c: ModelConfig, cache: KVCache, ws: Workspace
    ) {
        let n = ws.tokens
        // attention sub-block
        layer.inputNorm.rows(ws.x.data, into: ws.normed.data, tokens: n)
        layer.attention(layer: index, cache: cache, ws: ws)
        for j in 0..<(n * c.hiddenSize) { ws.x.data[j] += ws.projected.data[j] }
        // SwiGLU MLP sub-block
        layer.postAttentionNorm.rows(ws.x.data, into: ws.normed.data, tokens: n)
        layer.gate(ws.normed.data, tokens: n, into: ws.mlpA.data)
        layer.up(ws.normed.data, tokens: n, into: ws.mlpB.data)
        for j in 0..<(n * c.intermediateSize) {
            ws.mlpA.data[j] = silu(ws.mlpA.data[j]) * ws.mlpB.data[j]
        }
        layer.down(ws.mlpA.data, tokens: n, into: ws.mlpOut.data)
        for j in 0..<(n * c.hiddenSize) { ws.x.data[j] += ws.mlpOut.data[j] }
    }
}
