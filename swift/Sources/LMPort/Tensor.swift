/// A float32 array with a shape, owning its memory. The forward passes work on raw pointers
/// into these (like llama2.c's float*), which keeps the arithmetic loops free of array
/// bookkeeping; the class frees the memory when the last reference goes.
public final class Tensor {
    public let shape: [Int]
    public let count: Int
    public let data: UnsafeMutablePointer<Float>

    /// A zero-filled tensor.
    public init(shape: [Int]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.count = shape.reduce(1, *)
        self.data = .allocate(capacity: Swift.max(count, 1))
        data.initialize(repeating: 0, count: Swift.max(count, 1))
    }

    /// A tensor holding a copy of `values`, which must have shape.product elements.
    public convenience init(shape: [Int], values: [Float]) {
        self.init(shape: shape)
        precondition(values.count == count, "\(values.count) values for shape \(shape)")
        if count > 0 {
            values.withUnsafeBufferPointer { data.update(from: $0.baseAddress!, count: count) }
        }
    }

    deinit { data.deallocate() }

    /// A copy of the contents as a Swift array (for dumps and tests, not the hot path).
    public var array: [Float] { Array(UnsafeBufferPointer(start: data, count: count)) }
}
