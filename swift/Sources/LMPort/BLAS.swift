// Matrix products through the platform's BLAS: Accelerate on macOS, OpenBLAS elsewhere.
// Everything the port multiplies (projections, attention scores, attention output) goes
// through the three functions here, so the backend is chosen in one place.
#if canImport(Accelerate)
import Accelerate
#else
import COpenBLAS
#endif

public enum BLAS {
    /// The backend's name, printed by the CLI so a measurement says what did the arithmetic.
    #if canImport(Accelerate)
    public static let backend = "Accelerate"
    #else
    public static let backend = "OpenBLAS"
    #endif

    /// y[rows] = alpha * A[rows, cols] · x, with A row-major and `lda` floats between rows.
    /// Decode (one token) does all its projections with this: it reads each weight once.
    @inline(__always)
    public static func gemv(
        _ a: UnsafePointer<Float>, rows: Int, cols: Int, lda: Int,
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, alpha: Float = 1
    ) {
        cblas_sgemv(
            CblasRowMajor, CblasNoTrans, numericCast(rows), numericCast(cols), alpha,
            a, numericCast(lda), x, 1, 0, y, 1)
    }

    /// y[cols] = A[rows, cols]ᵀ · x: the weighted sum of A's rows (attention's values).
    @inline(__always)
    public static func gemvTransposed(
        _ a: UnsafePointer<Float>, rows: Int, cols: Int, lda: Int,
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>
    ) {
        cblas_sgemv(
            CblasRowMajor, CblasTrans, numericCast(rows), numericCast(cols), 1,
            a, numericCast(lda), x, 1, 0, y, 1)
    }

    /// Y[m, n] = X[m, k] · W[n, k]ᵀ: a linear layer over m tokens at once (prefill),
    /// with W in PyTorch's [out_features, in_features] layout.
    @inline(__always)
    public static func gemmWeightsTransposed(
        _ x: UnsafePointer<Float>, m: Int, k: Int,
        _ w: UnsafePointer<Float>, n: Int,
        _ y: UnsafeMutablePointer<Float>
    ) {
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, numericCast(m), numericCast(n),
            numericCast(k), 1, x, numericCast(k), w, numericCast(k), 0, y, numericCast(n))
    }

    /// Asks the BLAS to use `n` threads. Returns a note when the request cannot be honoured
    /// (Accelerate has no thread-count API), so the caller can say so instead of pretending.
    public static func setThreads(_ n: Int) -> String? {
        precondition(n >= 1, "threads must be >= 1")
        #if canImport(Accelerate)
        return "Accelerate chooses its own thread count; --threads \(n) was not applied"
        #else
        openblas_set_num_threads(Int32(n))
        return nil
        #endif
    }

    /// The thread count the BLAS will use, when it can tell.
    public static func threads() -> Int? {
        #if canImport(Accelerate)
        return nil
        #else
        return Int(openblas_get_num_threads())
        #endif
    }
}
