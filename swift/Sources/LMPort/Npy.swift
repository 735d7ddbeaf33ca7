import Foundation

/// Writes NumPy's .npy format (version 1.0): magic, a Python-dict header padded to 64
/// bytes, then little-endian float32 data in C order, so `numpy.load` reads it directly.
public func writeNpy(_ values: [Float], shape: [Int], to url: URL) throws {
    guard values.count == shape.reduce(1, *) else {
        throw LMPortError("\(url.path): \(values.count) values do not fill shape \(shape)")
    }
    let dims = shape.map(String.init).joined(separator: ", ") + (shape.count == 1 ? "," : "")
    var header = "{'descr': '<f4', 'fortran_order': False, 'shape': (\(dims)), }"
    let unpadded = 10 + header.utf8.count + 1  // magic+version+length, header, newline
    header += String(repeating: " ", count: (64 - unpadded % 64) % 64) + "\n"
    var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
    let length = UInt16(header.utf8.count)
    data.append(contentsOf: [UInt8(length & 0xff), UInt8(length >> 8)])
    data.append(contentsOf: Array(header.utf8))
    // Every platform Swift targets here (x86_64, arm64) is little-endian: bytes go as they are.
    values.withUnsafeBytes { data.append(contentsOf: $0) }
    try writeAtomically(data, to: url)
}

/// Writes to a temporary file beside `url`, then renames it into place, so a reader never
/// sees a half-written dump.
func writeAtomically(_ data: Data, to url: URL) throws {
    let temporary = url.deletingLastPathComponent()
        .appendingPathComponent(".\(url.lastPathComponent).\(ProcessInfo.processInfo.processIdentifier).tmp")
    do {
        try data.write(to: temporary)
        guard rename(temporary.path, url.path) == 0 else {
            throw LMPortError("rename failed (errno \(errno))")
        }
    } catch {
        try? FileManager.default.removeItem(at: temporary)
        throw LMPortError("\(url.path): cannot write (\(error))")
    }
}
