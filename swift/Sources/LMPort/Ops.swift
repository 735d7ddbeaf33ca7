import Foundation

// The elementwise and normalisation steps of both architectures, written to match
// transformers' float32 arithmetic: reductions accumulate in Double (PyTorch's vectorised
// reductions are close to exact), everything else is float32 in PyTorch's order.

/// RMSNorm (Zhang & Sennrich, 2019) as in HF Llama: weight * (x * rsqrt(mean(x²) + eps)).
@inline(__always)
func rmsNorm(
    _ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float, count n: Int,
    into out: UnsafeMutablePointer<Float>
) {
    var sumSquares = 0.0
    for i in 0..<n { sumSquares += Double(x[i]) * Double(x[i]) }
    let variance = Float(sumSquares / Double(n))
    let inverse = 1 / (variance + eps).squareRoot()
    for i in 0..<n { out[i] = weight[i] * (x[i] * inverse) }
}

/// LayerNorm (Ba et al., 2016) as in Phi: (x - mean) / sqrt(var + eps) * weight + bias,
/// with the biased variance.
@inline(__always)
func layerNorm(
    _ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
    eps: Float, count n: Int, into out: UnsafeMutablePointer<Float>
) {
    var sum = 0.0
    for i in 0..<n { sum += Double(x[i]) }
    let mean = sum / Double(n)
    var squares = 0.0
    for i in 0..<n {
        let d = Double(x[i]) - mean
        squares += d * d
    }
    let inverse = Float(1 / (squares / Double(n) + Double(eps)).squareRoot())
    let meanF = Float(mean)
    for i in 0..<n { out[i] = (x[i] - meanF) * inverse * weight[i] + bias[i] }
}

/// SiLU (Swish): x * sigmoid(x), the gate of Llama's SwiGLU MLP.
@inline(__always)
func silu(_ x: Float) -> Float { x / (1 + exp(-x)) }

/// The tanh approximation of GELU ("gelu_new"), Phi's MLP activation, in transformers' order:
/// 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x³))).
@inline(__always)
func geluTanh(_ x: Float) -> Float {
    let c = Float((2.0 / Double.pi).squareRoot())
    return 0.5 * x * (1 + tanh(c * (x + 0.044715 * (x * x * x))))
}

/// Softmax in place over n scores: subtract the max, exponentiate, normalise.
@inline(__always)
func softmax(_ x: UnsafeMutablePointer<Float>, count n: Int) {
    var maximum = -Float.infinity
    for i in 0..<n where x[i] > maximum { maximum = x[i] }
    var sum: Double = 0
    for i in 0..<n {
        x[i] = exp(x[i] - maximum)
        sum += Double(x[i])
    }
    let inverse = Float(1 / sum)
    for i in 0..<n { x[i] *= inverse }
}

/// Index of the largest value (the first one on ties, as torch.argmax on CPU).
public func argmax(_ x: UnsafePointer<Float>, count n: Int) -> Int {
    var best = 0
    for i in 1..<n where x[i] > x[best] { best = i }
    return best
}

/// Rotary position embedding (Su et al., 2021) in transformers' "rotate_half" convention:
/// the rotated dimensions are split in two halves (not interleaved pairs), and
/// x' = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
/// Only the first `rotaryDim` dimensions of each head turn (Phi's partial rotary); the rest
/// pass through.
struct Rotary {
    let rotaryDim: Int
    /// inv_freq[i] = 1 / theta^(2i / rotaryDim), computed in float32 as transformers does.
    let inverseFrequency: [Float]

    init(rotaryDim: Int, theta: Float) {
        self.rotaryDim = rotaryDim
        inverseFrequency = (0..<(rotaryDim / 2)).map { i in
            1 / pow(theta, Float(2 * i) / Float(rotaryDim))
        }
    }

    /// Rotates each of `heads` vectors (stride `headDim`) in `x` for one position.
    @inline(__always)
    func apply(
        _ x: UnsafeMutablePointer<Float>, heads: Int, headDim: Int,
        cos: UnsafePointer<Float>, sin: UnsafePointer<Float>
    ) {
        let half = rotaryDim / 2
        for h in 0..<heads {
            let v = x + h * headDim
            for i in 0..<half {
                let x1 = v[i]
                let x2 = v[i + half]
                v[i] = x1 * cos[i] - x2 * sin[i]
                v[i + half] = x2 * cos[i] + x1 * sin[i]
            }
        }
    }

    /// cos and sin of position * inv_freq (the angle product in float32, like transformers).
    @inline(__always)
    func angles(
        position: Int, cos: UnsafeMutablePointer<Float>, sin: UnsafeMutablePointer<Float>
    ) {
        for i in 0..<inverseFrequency.count {
            let angle = Float(position) * inverseFrequency[i]
            cos[i] = Foundation.cos(angle)
            sin[i] = Foundation.sin(angle)
        }
    }
}
