import Foundation

/// Reads the safetensors format (https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length, a JSON header mapping each tensor name to its dtype, shape
/// and byte range, then the raw little-endian data. The file is memory-mapped, so opening a
/// multi-gigabyte checkpoint costs nothing until a tensor is read.
public struct SafetensorsFile {
    public struct Entry: Sendable {
        public let dtype: String
        public let shape: [Int]
        public let begin: Int
        public let end: Int
    }

    public let url: URL
    public let entries: [String: Entry]
    private let bytes: Data
    private let dataStart: Int

    public init(url: URL) throws {
        self.url = url
        let data: Data
        do {
            data = try Data(contentsOf: url, options: .alwaysMapped)
        } catch {
            throw LMPortError("\(url.path): cannot read safetensors file (\(error))")
        }
        guard data.count >= 8 else {
            throw LMPortError("\(url.path): \(data.count) bytes, too short for a safetensors header")
        }
        let headerLength = data.withUnsafeBytes { raw in
            Int(UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)))
        }
        guard headerLength > 0, 8 + headerLength <= data.count else {
            throw LMPortError("\(url.path): header length \(headerLength) does not fit the file")
        }
        let json = data.subdata(in: 8..<(8 + headerLength))
        guard let header = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
            throw LMPortError("\(url.path): the safetensors header is not a JSON object")
        }
        var entries: [String: Entry] = [:]
        for (name, value) in header where name != "__metadata__" {
            guard let info = value as? [String: Any],
                let dtype = info["dtype"] as? String,
                let shape = info["shape"] as? [Int],
                let offsets = info["data_offsets"] as? [Int], offsets.count == 2
            else {
                throw LMPortError("\(url.path): tensor \(name) lacks dtype/shape/data_offsets")
            }
            entries[name] = Entry(dtype: dtype, shape: shape, begin: offsets[0], end: offsets[1])
        }
        self.entries = entries
        self.bytes = data
        self.dataStart = 8 + headerLength
    }

    /// The tensor `name` converted to float32, whatever its stored dtype (F32, F16, BF16).
    public func tensor(_ name: String) throws -> Tensor {
        guard let entry = entries[name] else {
            throw LMPortError("\(url.path): no tensor named \(name)")
        }
        let count = entry.shape.reduce(1, *)
        let width: Int
        switch entry.dtype {
        case "F32": width = 4
        case "F16", "BF16": width = 2
        default:
            throw LMPortError(
                "\(url.path): tensor \(name) has dtype \(entry.dtype); expected F32, F16 or BF16")
        }
        guard entry.end - entry.begin == count * width, dataStart + entry.end <= bytes.count else {
            throw LMPortError(
                "\(url.path): tensor \(name) byte range \(entry.begin)..<\(entry.end) does not "
                    + "match shape \(entry.shape) of \(entry.dtype) or runs past the file")
        }
        let out = Tensor(shape: entry.shape)
        let start = dataStart + entry.begin
        bytes.withUnsafeBytes { raw in
            let src = raw.baseAddress!.advanced(by: start)
            switch entry.dtype {
            case "F32":
                for i in 0..<count {
                    out.data[i] = Float(
                        bitPattern: UInt32(
                            littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
                }
            case "F16":
                for i in 0..<count {
                    out.data[i] = halfToFloat(
                        UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                }
            default:  // BF16: the upper half of a float32
                for i in 0..<count {
                    let bits = UInt16(
                        littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
                    out.data[i] = Float(bitPattern: UInt32(bits) << 16)
                }
            }
        }
        return out
    }
}

/// IEEE 754 half -> float, by bits, so it works where Swift's Float16 is unavailable
/// (Intel macOS). Handles zeros, subnormals, infinities and NaN exactly.
@inline(__always)
public func halfToFloat(_ h: UInt16) -> Float {
    let sign = UInt32(h & 0x8000) << 16
    let exponent = Int((h >> 10) & 0x1f)
    var mantissa = UInt32(h & 0x3ff)
    if exponent == 0 {
        if mantissa == 0 { return Float(bitPattern: sign) }
        // Subnormal half: normalise it into a float.
        var e = -1
        repeat {
            e += 1
            mantissa <<= 1
        } while mantissa & 0x400 == 0
        mantissa &= 0x3ff
        let bits = sign | UInt32(127 - 15 - e) << 23 | mantissa << 13
        return Float(bitPattern: bits)
    }
    if exponent == 0x1f {
        return Float(bitPattern: sign | 0x7f80_0000 | mantissa << 13)
    }
    return Float(bitPattern: sign | UInt32(exponent - 15 + 127) << 23 | mantissa << 13)
}

/// The weights of a model folder: one model.safetensors, or shards listed in
/// model.safetensors.index.json (how Llama 2 7B and Phi-2 ship).
public struct WeightStore {
    public let directory: URL
    private var files: [String: SafetensorsFile] = [:]
    private var location: [String: String] = [:]

    public init(directory: URL) throws {
        self.directory = directory
        let fm = FileManager.default
        let single = directory.appendingPathComponent("model.safetensors")
        let index = directory.appendingPathComponent("model.safetensors.index.json")
        if fm.fileExists(atPath: single.path) {
            let file = try SafetensorsFile(url: single)
            files["model.safetensors"] = file
            for name in file.entries.keys { location[name] = "model.safetensors" }
        } else if fm.fileExists(atPath: index.path) {
            let data = try Data(contentsOf: index)
            guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                let map = json["weight_map"] as? [String: String]
            else {
                throw LMPortError("\(index.path): expected a JSON object with a weight_map")
            }
            for (name, shard) in map {
                if files[shard] == nil {
                    files[shard] = try SafetensorsFile(url: directory.appendingPathComponent(shard))
                }
                location[name] = shard
            }
        } else {
            throw LMPortError(
                "\(directory.path): no model.safetensors or model.safetensors.index.json "
                    + "(only safetensors weights are read)")
        }
    }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    /// The dtype the checkpoint stores `name` in (F32, F16, BF16).
    public func dtype(_ name: String) -> String? {
        guard let shard = location[name] else { return nil }
        return files[shard]?.entries[name]?.dtype
    }

    /// The tensor `name` as float32, checked against the shape the config implies.
    public func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        guard let shard = location[name], let file = files[shard] else {
            throw LMPortError("\(directory.path): the weights have no tensor \(name)")
        }
        let t = try file.tensor(name)
        guard t.shape == shape else {
            throw LMPortError(
                "\(file.url.path): tensor \(name) has shape \(t.shape); config.json implies \(shape)")
        }
        return t
    }
}
