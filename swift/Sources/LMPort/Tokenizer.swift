import Foundation

/// Byte-level BPE (GPT-2 style) read from a Hugging Face `tokenizer.json`, so the CLI can take
/// text. Encoding follows the `tokenizers` library step by step:
///  1. added tokens (`<|bos|>`, ...) are cut out of the text as exact strings;
///  2. the ByteLevel pre-tokenizer splits the rest with GPT-2's regex and maps every UTF-8 byte
///     to a printable character (bytes_to_unicode);
///  3. each piece is merged pair by pair, lowest merge rank first (Sennrich et al., 2016);
///  4. the TemplateProcessing post-processor adds the special tokens around the sequence.
/// The Swift test checks the ids against `tokenizers` on a test corpus.
public final class BPETokenizer {
    struct Pair: Hashable {
        let left: String
        let right: String
    }

    let vocab: [String: Int]
    let tokens: [Int: String]
    let ranks: [Pair: Int]
    /// Added tokens, longest first, so "<|eos|>" is found before any shorter prefix.
    let added: [(String, Int)]
    let addPrefixSpace: Bool
    let splitter: NSRegularExpression?
    /// Ids placed before and after the sequence by the post-processor ("single" template).
    let prefixIds: [Int]
    let suffixIds: [Int]
    let byteToChar: [Character]
    let charToByte: [Character: UInt8]
    private var cache: [String: [Int]] = [:]

    /// GPT-2's pre-tokenizer pattern, as `tokenizers`' ByteLevel uses it.
    static let gpt2Pattern =
        #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#

    public convenience init(directory: URL) throws {
        try self.init(url: directory.appendingPathComponent("tokenizer.json"))
    }

    public init(url: URL) throws {
        func fail(_ what: String) -> LMPortError { LMPortError("\(url.path): \(what)") }
        guard let data = try? Data(contentsOf: url),
            let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { throw fail("missing or not a JSON tokenizer") }
        guard let model = json["model"] as? [String: Any], model["type"] as? String == "BPE",
            let vocab = model["vocab"] as? [String: Int], let merges = model["merges"] as? [Any]
        else { throw fail("expected a BPE model with vocab and merges") }
        if let normalizer = json["normalizer"], !(normalizer is NSNull) {
            throw fail("normalizers are not ported (this tokenizer has one)")
        }
        guard let pre = json["pre_tokenizer"] as? [String: Any], pre["type"] as? String == "ByteLevel"
        else { throw fail("expected a ByteLevel pre_tokenizer") }
        self.vocab = vocab
        tokens = Dictionary(uniqueKeysWithValues: vocab.map { ($1, $0) })
        var ranks: [Pair: Int] = [:]
        for (rank, merge) in merges.enumerated() {
            // Two spellings: "a b" (older files) or ["a", "b"].
            if let text = merge as? String {
                let parts = text.split(separator: " ", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { throw fail("merge \(rank) \"\(text)\" is not a pair") }
                ranks[Pair(left: parts[0], right: parts[1])] = rank
            } else if let parts = merge as? [String], parts.count == 2 {
                ranks[Pair(left: parts[0], right: parts[1])] = rank
            } else {
                throw fail("merge \(rank) is neither \"a b\" nor [a, b]")
            }
        }
        self.ranks = ranks
        var added: [(String, Int)] = []
        for entry in json["added_tokens"] as? [[String: Any]] ?? [] {
            if let content = entry["content"] as? String, let id = entry["id"] as? Int {
                added.append((content, id))
            }
        }
        self.added = added.sorted { $0.0.count > $1.0.count }
        addPrefixSpace = pre["add_prefix_space"] as? Bool ?? false
        splitter =
            (pre["use_regex"] as? Bool ?? true)
            ? try NSRegularExpression(pattern: BPETokenizer.gpt2Pattern) : nil

        var prefix: [Int] = []
        var suffix: [Int] = []
        if let post = json["post_processor"] as? [String: Any] {
            switch post["type"] as? String {
            case "TemplateProcessing":
                let specials = post["special_tokens"] as? [String: [String: Any]] ?? [:]
                var seenSequence = false
                for item in post["single"] as? [[String: Any]] ?? [] {
                    if item["Sequence"] != nil {
                        seenSequence = true
                    } else if let special = item["SpecialToken"] as? [String: Any],
                        let name = special["id"] as? String,
                        let ids = specials[name]?["ids"] as? [Int]
                    {
                        if seenSequence { suffix += ids } else { prefix += ids }
                    } else {
                        throw fail("post_processor template item \(item) not understood")
                    }
                }
            case "ByteLevel":
                break  // only adjusts offsets
            default:
                throw fail("post_processor \(post["type"] ?? "?") is not ported")
            }
        }
        prefixIds = prefix
        suffixIds = suffix

        // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
        var printable = Array(33...126) + Array(161...172) + Array(174...255)
        var codes = printable
        var n = 0
        for b in 0..<256 where !printable.contains(b) {
            printable.append(b)
            codes.append(256 + n)
            n += 1
        }
        var byteToChar = [Character](repeating: " ", count: 256)
        var charToByte: [Character: UInt8] = [:]
        for (b, c) in zip(printable, codes) {
            let ch = Character(Unicode.Scalar(UInt32(c))!)
            byteToChar[b] = ch
            charToByte[ch] = UInt8(b)
        }
        self.byteToChar = byteToChar
        self.charToByte = charToByte
    }

    /// Token ids of `text`, with the post-processor's special tokens when `addSpecialTokens`.
    public func encode(_ text: String, addSpecialTokens: Bool = true) -> [Int] {
        var ids = addSpecialTokens ? prefixIds : []
        for (piece, id) in splitAddedTokens(text) {
            if let id {
                ids.append(id)
            } else {
                ids += encodeOrdinary(piece)
            }
        }
        if addSpecialTokens { ids += suffixIds }
        return ids
    }

    /// The text of `ids` (special tokens are kept as their text unless `skipSpecial`).
    public func decode(_ ids: [Int], skipSpecial: Bool = true) -> String {
        let specialIds = Set(added.map { $0.1 })
        var bytes: [UInt8] = []
        for id in ids {
            if specialIds.contains(id) {
                if !skipSpecial, let text = tokens[id] { bytes += Array(text.utf8) }
                continue
            }
            for ch in tokens[id] ?? "" {
                if let b = charToByte[ch] { bytes.append(b) }
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Splits `text` around added tokens: (piece, id) with id set for an added token.
    func splitAddedTokens(_ text: String) -> [(String, Int?)] {
        guard !added.isEmpty else { return [(text, nil)] }
        var out: [(String, Int?)] = []
        var rest = Substring(text)
        var ordinary = ""
        outer: while !rest.isEmpty {
            for (content, id) in added where rest.hasPrefix(content) {
                if !ordinary.isEmpty { out.append((ordinary, nil)) }
                ordinary = ""
                out.append((content, id))
                rest = rest.dropFirst(content.count)
                continue outer
            }
            ordinary.append(rest.removeFirst())
        }
        if !ordinary.isEmpty { out.append((ordinary, nil)) }
        return out
    }

    func encodeOrdinary(_ text: String) -> [Int] {
        var text = text
        if addPrefixSpace, !text.hasPrefix(" ") { text = " " + text }
        var ids: [Int] = []
        for word in preTokenize(text) {
            if let hit = cache[word] {
                ids += hit
                continue
            }
            let mapped = String(word.utf8.map { byteToChar[Int($0)] })
            let wordIds = bpe(mapped).map { vocab[$0] ?? -1 }
            cache[word] = wordIds
            ids += wordIds
        }
        return ids
    }

    func preTokenize(_ text: String) -> [String] {
        guard let splitter else { return [text] }
        let ns = text as NSString
        return splitter.matches(in: text, range: NSRange(location: 0, length: ns.length))
            .map { ns.substring(with: $0.range) }
    }

    /// Merges the symbols of one word, always the pair with the lowest rank first.
    func bpe(_ word: String) -> [String] {
        var symbols = word.map { String($0) }
        while symbols.count > 1 {
            var best: (rank: Int, index: Int)?
            for i in 0..<(symbols.count - 1) {
                if let rank = ranks[Pair(left: symbols[i], right: symbols[i + 1])],
                    best == nil || rank < best!.rank
                {
                    best = (rank, i)
                }
            }
            guard let best else { break }
            let left = symbols[best.index]
            let right = symbols[best.index + 1]
            var merged: [String] = []
            merged.reserveCapacity(symbols.count)
            var i = 0
            while i < symbols.count {
                if i + 1 < symbols.count, symbols[i] == left, symbols[i + 1] == right {
                    merged.append(left + right)
                    i += 2
                } else {
                    merged.append(symbols[i])
                    i += 1
                }
            }
            symbols = merged
        }
        return symbols
    }
}
