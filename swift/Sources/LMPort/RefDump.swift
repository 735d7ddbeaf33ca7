import Foundation

/// A reference dump written by labkit.refdump (the PyTorch side): the prompt, the hidden
/// state after chosen layers at every processed position, the logits of every greedy step,
/// and the greedy tokens. Layout (version 1):
///
///     bytes 0..<8    magic "LMREFDMP"
///     bytes 8..<12   format version, uint32 little-endian
///     bytes 12..<16  header length in bytes, uint32 little-endian
///     header         UTF-8 JSON: {"arrays": {name: {dtype, shape, offset, nbytes}},
///                    "layer_indices": [...], "meta": {...}}
///     data           from the next multiple of 16; each array at its offset from there,
///                    little-endian float32 or int32, C order
public struct RefDump {
    public static let magic = Array("LMREFDMP".utf8)
    public static let version: UInt32 = 1

    public struct ArrayEntry: Decodable, Sendable {
        public let dtype: String
        public let shape: [Int]
        public let offset: Int
        public let nbytes: Int
    }

    public struct Meta: Decodable, Sendable {
        public let arch: String?
        public let dtype: String?
        public let steps: Int?
        public let source: String?
        /// The smallest gap between the top two logits over all steps: below 2 × the logit
        /// tolerance a greedy choice is decided by rounding (labkit avoids such prompts).
        public let minTop2Margin: Double?
    }

    struct Header: Decodable {
        let arrays: [String: ArrayEntry]
        let layerIndices: [Int]
        let meta: Meta?
    }

    public let url: URL
    public let promptTokens: [Int]
    /// Indices of the decoder layers whose output `hidden` holds (0 = first layer).
    public let layerIndices: [Int]
    /// [layerIndices.count, positions, hiddenSize], flattened.
    public let hidden: [Float]
    public let hiddenShape: [Int]
    /// [steps, vocab], flattened.
    public let logits: [Float]
    public let logitsShape: [Int]
    public let greedyTokens: [Int]
    public let meta: Meta?

    public var steps: Int { logitsShape[0] }
    public var vocabSize: Int { logitsShape[1] }
    public var positions: Int { hiddenShape[1] }
    public var hiddenSize: Int { hiddenShape[2] }

    public init(url: URL) throws {
        self.url = url
        guard let data = try? Data(contentsOf: url) else {
            throw LMPortError("\(url.path): reference dump missing or unreadable")
        }
        guard data.count >= 16, Array(data.prefix(8)) == RefDump.magic else {
            throw LMPortError("\(url.path): not a labkit reference dump (magic LMREFDMP expected)")
        }
        let version = data.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self)) }
        guard version == RefDump.version else {
            throw LMPortError(
                "\(url.path): reference dump version \(version); this reader expects \(RefDump.version)")
        }
        let headerLength = Int(
            data.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self)) })
        guard 16 + headerLength <= data.count else {
            throw LMPortError("\(url.path): header length \(headerLength) runs past the file")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let header: Header
        do {
            header = try decoder.decode(Header.self, from: data.subdata(in: 16..<(16 + headerLength)))
        } catch {
            throw LMPortError("\(url.path): bad header JSON (\(error))")
        }
        let dataStart = (16 + headerLength + 15) / 16 * 16

        func entry(_ name: String, dtype: String, rank: Int) throws -> ArrayEntry {
            guard let e = header.arrays[name] else { throw LMPortError("\(url.path): no array \(name)") }
            guard e.dtype == dtype, e.shape.count == rank,
                e.nbytes == 4 * e.shape.reduce(1, *), dataStart + e.offset + e.nbytes <= data.count
            else {
                throw LMPortError(
                    "\(url.path): array \(name) is \(e.dtype) \(e.shape) (\(e.nbytes) bytes at \(e.offset)); "
                        + "expected \(dtype) of rank \(rank) inside the file")
            }
            return e
        }
        func floats(_ e: ArrayEntry) -> [Float] {
            data.withUnsafeBytes { raw in
                (0..<(e.nbytes / 4)).map { i in
                    Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(
                        fromByteOffset: dataStart + e.offset + 4 * i, as: UInt32.self)))
                }
            }
        }
        func ints(_ e: ArrayEntry) -> [Int] {
            data.withUnsafeBytes { raw in
                (0..<(e.nbytes / 4)).map { i in
                    Int(Int32(littleEndian: raw.loadUnaligned(
                        fromByteOffset: dataStart + e.offset + 4 * i, as: Int32.self)))
                }
            }
        }
        let prompt = try entry("prompt_tokens", dtype: "int32", rank: 1)
        let hidden = try entry("hidden", dtype: "float32", rank: 3)
        let logits = try entry("logits", dtype: "float32", rank: 2)
        let greedy = try entry("greedy_tokens", dtype: "int32", rank: 1)
        guard greedy.shape[0] == logits.shape[0], hidden.shape[0] == header.layerIndices.count else {
            throw LMPortError(
                "\(url.path): inconsistent shapes: greedy_tokens \(greedy.shape), logits \(logits.shape), "
                    + "hidden \(hidden.shape) for \(header.layerIndices.count) layer indices")
        }
        promptTokens = ints(prompt)
        layerIndices = header.layerIndices
        self.hidden = floats(hidden)
        hiddenShape = hidden.shape
        self.logits = floats(logits)
        logitsShape = logits.shape
        greedyTokens = ints(greedy)
        meta = header.meta
    }
}
