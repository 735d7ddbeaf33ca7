/// Phi-2 (Microsoft, 2023) as transformers' PhiForCausalLM: a parallel block, where attention
/// and MLP read the same LayerNorm output and add to the residual together,
///   h = layernorm(x);  x = attention(h) + fc2(gelu(fc1(h))) + x
/// with biases everywhere, RoPE on only the first rotaryDim dimensions of each head
/// (partial_rotary_factor), a final LayerNorm and an lm_head with bias. The embedding, the
/// layer loop and lm_head are DecoderModel's.
enum Phi: DecoderArchitecture {
    struct Layer {
        let norm: LayerNorm  // input_layernorm, read by attention and MLP alike
        let attention: SelfAttention
        let fc1, fc2: Linear  // mlp.fc1, mlp.fc2
    }

    typealias FinalNorm = LayerNorm
    static let finalNormName = "model.final_layernorm"

    static func lmHeadBias(in store: WeightStore) -> Bool { store.contains("lm_head.bias") }

    static func layer(
        _ store: WeightStore, prefix p: String, config c: ModelConfig, rotary: Rotary
    ) throws -> Layer {
        Layer(
            norm: try LayerNorm(store, p + "input_layernorm", config: c),
            attention: try SelfAttention(
                store, prefix: p + "self_attn.", config: c, output: "dense", bias: true,
                rotary: rotary),
            fc1: try Linear(store, p + "mlp.fc1", in: c.hiddenSize, out: c.intermediateSize, bias: true),
            fc2: try Linear(store, p + "mlp.fc2", in: c.intermediateSize, out: c.hiddenSize, bias: true))
    }

    static func apply(
        _ layer: Layer, index: Int, config c: ModelConfig, cache: KVCache, ws: Workspace
    ) {
        let n = ws.tokens
        layer.norm.rows(ws.x.data, into: ws.normed.data, tokens: n)
        layer.attention(layer: index, cache: cache, ws: ws)
        layer.fc1(ws.normed.data, tokens: n, into: ws.mlpA.data)
        for j in 0..<(n * c.intermediateSize) { ws.mlpA.data[j] = geluTanh(ws.mlpA.data[j]) }
        layer.fc2(ws.mlpA.data, tokens: n, into: ws.mlpOut.data)
        // transformers' order: (attention + mlp) + residual
        for j in 0..<(n * c.hiddenSize) {
            ws.x.data[j] = (ws.projected.data[j] + ws.mlpOut.data[j]) + ws.x.data[j]
        }
    }
}
