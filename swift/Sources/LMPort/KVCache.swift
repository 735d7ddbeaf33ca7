/// The key/value cache, allocated once for the whole generation (prompt + new tokens), so
/// decoding never allocates. Per layer, keys and values are [capacity, kvHeads * headDim]:
/// one contiguous row per position, which is what attention reads with a strided gemv.
public final class KVCache {
    public let capacity: Int
    public let kvDim: Int
    /// Positions filled so far; the next token goes at this position.
    public private(set) var length = 0
    let keys: [Tensor]
    let values: [Tensor]

    public init(layers: Int, capacity: Int, kvDim: Int) {
        self.capacity = capacity
        self.kvDim = kvDim
        keys = (0..<layers).map { _ in Tensor(shape: [capacity, kvDim]) }
        values = (0..<layers).map { _ in Tensor(shape: [capacity, kvDim]) }
    }

    /// Bytes held by keys and values: 2 * layers * capacity * kvDim * 4.
    public var bytes: Int { 2 * keys.count * capacity * kvDim * MemoryLayout<Float>.size }

    /// Fails before any work when `count` more positions would not fit.
    func reserve(_ count: Int) throws {
        guard length + count <= capacity else {
            throw LMPortError(
                "KV cache full: \(length) + \(count) positions > capacity \(capacity)")
        }
    }

    /// Stores the keys and values of `count` new positions of `layer` (not yet committed).
    func write(
        layer: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, count: Int
    ) {
        let offset = length * kvDim
        (keys[layer].data + offset).update(from: k, count: count * kvDim)
        (values[layer].data + offset).update(from: v, count: count * kvDim)
    }

    /// Commits `count` positions after every layer has written them.
    func advance(_ count: Int) { length += count }

    /// Forgets everything (the memory stays allocated).
    public func reset() { length = 0 }
}
