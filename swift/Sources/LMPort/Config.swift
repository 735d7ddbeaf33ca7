import Foundation

/// config.json as transformers writes it, for the two architectures the port runs. Every
/// field that some transformers version leaves out is optional; `ModelConfig` resolves the
/// defaults in one place.
public struct HFConfig: Decodable, Sendable {
    /// RoPE settings: `rope_parameters` (transformers >= 5) or the older `rope_scaling`.
    public struct Rope: Decodable, Sendable {
        public var ropeType: String?
        public var type: String?
        public var ropeTheta: Double?
        public var partialRotaryFactor: Double?
    }

    public var modelType: String?
    public var architectures: [String]?
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int?
    public var headDim: Int?
    public var vocabSize: Int
    public var maxPositionEmbeddings: Int?
    public var rmsNormEps: Double?
    public var layerNormEps: Double?
    public var ropeTheta: Double?
    public var partialRotaryFactor: Double?
    public var ropeScaling: Rope?
    public var ropeParameters: Rope?
    public var tieWordEmbeddings: Bool?
    public var attentionBias: Bool?
    public var mlpBias: Bool?
    public var hiddenAct: String?
    public var qkLayernorm: Bool?
}

public enum Architecture: String, Sendable {
    case llama
    case phi
}

/// The resolved hyper-parameters the forward passes use.
public struct ModelConfig: Sendable {
    public var architecture: Architecture
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layers: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int
    /// How many leading dimensions of each head RoPE rotates: headDim for Llama,
    /// int(headDim * partial_rotary_factor) for Phi.
    public var rotaryDim: Int
    public var ropeTheta: Float
    public var vocabSize: Int
    public var maxPositions: Int
    public var normEps: Float
    public var tieWordEmbeddings: Bool
    public var attentionBias: Bool
    public var mlpBias: Bool

    /// Reads and checks `directory/config.json`.
    public static func load(directory: URL) throws -> ModelConfig {
        let url = directory.appendingPathComponent("config.json")
        guard let data = try? Data(contentsOf: url) else {
            throw LMPortError("\(url.path): missing or unreadable (a model folder needs config.json)")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let raw: HFConfig
        do {
            raw = try decoder.decode(HFConfig.self, from: data)
        } catch {
            throw LMPortError("\(url.path): not a transformers config (\(error))")
        }
        do {
            return try ModelConfig(raw)
        } catch let error as LMPortError {
            throw LMPortError("\(url.path): \(error.description)")
        }
    }

    public init(_ c: HFConfig) throws {
        let type = c.modelType ?? ""
        let archs = c.architectures ?? []
        if type == "llama" || archs.contains("LlamaForCausalLM") {
            architecture = .llama
        } else if type == "phi" || archs.contains("PhiForCausalLM") {
            architecture = .phi
        } else {
            throw LMPortError(
                "model_type \(type.isEmpty ? "(none)" : type) / architectures \(archs): "
                    + "expected llama (LlamaForCausalLM) or phi (PhiForCausalLM)")
        }
        hiddenSize = c.hiddenSize
        intermediateSize = c.intermediateSize
        layers = c.numHiddenLayers
        heads = c.numAttentionHeads
        kvHeads = c.numKeyValueHeads ?? c.numAttentionHeads
        headDim = c.headDim ?? c.hiddenSize / max(c.numAttentionHeads, 1)
        vocabSize = c.vocabSize
        maxPositions = c.maxPositionEmbeddings ?? 2048
        tieWordEmbeddings = c.tieWordEmbeddings ?? false
        guard heads > 0, kvHeads > 0, heads % kvHeads == 0 else {
            throw LMPortError(
                "num_attention_heads \(heads) must be a positive multiple of num_key_value_heads \(kvHeads)")
        }
        guard hiddenSize > 0, layers > 0, vocabSize > 0, headDim > 0, intermediateSize > 0 else {
            throw LMPortError("hidden_size, num_hidden_layers, vocab_size, intermediate_size must be > 0")
        }
        let rope = c.ropeParameters ?? c.ropeScaling
        let ropeType = rope?.ropeType ?? rope?.type ?? "default"
        guard ropeType == "default" else {
            throw LMPortError("rope type \(ropeType): only the default (unscaled) RoPE is ported")
        }
        ropeTheta = Float(c.ropeParameters?.ropeTheta ?? c.ropeTheta ?? 10000)
        switch architecture {
        case .llama:
            rotaryDim = headDim
            normEps = Float(c.rmsNormEps ?? 1e-6)
            attentionBias = c.attentionBias ?? false
            mlpBias = c.mlpBias ?? false
            let act = c.hiddenAct ?? "silu"
            guard act == "silu" else {
                throw LMPortError("hidden_act \(act): the Llama port implements silu (SwiGLU)")
            }
        case .phi:
            let factor = c.ropeParameters?.partialRotaryFactor ?? c.partialRotaryFactor ?? 0.5
            rotaryDim = Int(Double(headDim) * factor)
            normEps = Float(c.layerNormEps ?? 1e-5)
            attentionBias = true
            mlpBias = true
            let act = c.hiddenAct ?? "gelu_new"
            guard act == "gelu_new" || act == "gelu_pytorch_tanh" else {
                throw LMPortError("hidden_act \(act): the Phi port implements gelu_new (tanh GELU)")
            }
            guard c.qkLayernorm != true else {
                throw LMPortError("qk_layernorm true: not ported (Phi-2 does not use it)")
            }
        }
        guard rotaryDim % 2 == 0, rotaryDim <= headDim else {
            throw LMPortError("rotary dimension \(rotaryDim) must be even and <= head_dim \(headDim)")
        }
    }
}
