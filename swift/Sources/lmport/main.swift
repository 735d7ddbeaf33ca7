// lmport: greedy generation with the Swift port, printing the tokens and the decode speed.
//
//   lmport --model DIR (--tokens 1,2,3 | --text "Once upon") [--max-new N] [--dump logits.npy]
//          [--dump-hidden hidden.npy] [--force 4,5,6] [--threads N] [--json]
//
// --text encodes the prompt with the folder's tokenizer.json (byte-level BPE) and prints the
// generated text too; --dump writes the logits of every step as a [steps, vocab] float32 .npy; --dump-hidden the
// hidden state after every layer at every processed position, [layers, positions, hidden];
// --force feeds the given tokens instead of the model's own (teacher forcing, for comparing
// logits after two implementations disagree); --json prints one JSON object for labkit.
import Foundation
import LMPort

let usage = """
    usage: lmport --model DIR (--tokens 1,2,3 | --text TEXT) [--max-new N] [--dump FILE.npy]
                  [--dump-hidden FILE.npy] [--force 4,5,6] [--threads N] [--json]
    """

struct Options {
    var model: String?
    var tokens: [Int] = []
    var text: String?
    var maxNew = 32
    var dump: String?
    var dumpHidden: String?
    var forced: [Int]?
    var threads: Int?
    var json = false
}

func parseTokens(_ text: String, flag: String) throws -> [Int] {
    let parts = text.split(separator: ",", omittingEmptySubsequences: true)
    let ids = parts.compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
    guard !parts.isEmpty, ids.count == parts.count else {
        throw LMPortError("\(flag): expected comma-separated token ids like 1,2,3, got \"\(text)\"")
    }
    return ids
}

func parse(_ arguments: [String]) throws -> Options {
    var options = Options()
    var i = 0
    func value(_ flag: String) throws -> String {
        i += 1
        guard i < arguments.count else { throw LMPortError("\(flag): missing value\n\(usage)") }
        return arguments[i]
    }
    func positive(_ flag: String) throws -> Int {
        let text = try value(flag)
        guard let n = Int(text), n >= 1 else {
            throw LMPortError("\(flag): expected an integer >= 1, got \"\(text)\"")
        }
        return n
    }
    while i < arguments.count {
        let flag = arguments[i]
        switch flag {
        case "--model": options.model = try value(flag)
        case "--tokens": options.tokens = try parseTokens(try value(flag), flag: flag)
        case "--text": options.text = try value(flag)
        case "--max-new": options.maxNew = try positive(flag)
        case "--dump": options.dump = try value(flag)
        case "--dump-hidden": options.dumpHidden = try value(flag)
        case "--force": options.forced = try parseTokens(try value(flag), flag: flag)
        case "--threads": options.threads = try positive(flag)
        case "--json": options.json = true
        case "-h", "--help":
            print(usage)
            exit(0)
        default: throw LMPortError("unknown argument \(flag)\n\(usage)")
        }
        i += 1
    }
    guard options.model != nil else { throw LMPortError("--model DIR is required\n\(usage)") }
    guard options.tokens.isEmpty != (options.text == nil) else {
        throw LMPortError("give exactly one of --tokens and --text\n\(usage)")
    }
    return options
}

func jsonString(_ object: [String: Any]) -> String {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    return String(decoding: data, as: UTF8.self)
}

func run() throws {
    let options = try parse(Array(CommandLine.arguments.dropFirst()))
    var threadNote: String?
    if let threads = options.threads { threadNote = BLAS.setThreads(threads) }
    let loadStart = ContinuousClock.now
    let directory = URL(fileURLWithPath: options.model!)
    let model = try loadModel(directory: directory)
    let tokenizer = options.text != nil ? try BPETokenizer(directory: directory) : nil
    let loadTime = ContinuousClock.now - loadStart
    let prompt = tokenizer.map { $0.encode(options.text!) } ?? options.tokens
    let result = try generateGreedy(
        model: model, prompt: prompt, maxNew: options.maxNew, forced: options.forced,
        keepLogits: options.dump != nil, keepHidden: options.dumpHidden != nil)
    let c = model.config
    if let dump = options.dump {
        try writeNpy(
            result.logits.flatMap { $0 }, shape: [result.logits.count, c.vocabSize],
            to: URL(fileURLWithPath: dump))
    }
    if let dump = options.dumpHidden {
        let positions = result.hidden.first.map { $0.count / c.hiddenSize } ?? 0
        try writeNpy(
            result.hidden.flatMap { $0 }, shape: [c.layers, positions, c.hiddenSize],
            to: URL(fileURLWithPath: dump))
    }
    let tokPerSec = result.decodeTokensPerSecond
    if options.json {
        var object: [String: Any] = [
            "arch": c.architecture.rawValue,
            "blas": BLAS.backend,
            "prompt_tokens": result.promptTokens,
            "tokens": result.tokens,
            "prefill_s": result.prefillSeconds,
            "decode_s": result.decodeSeconds,
            "decode_steps": result.tokens.count - 1,
            "load_s": Double(loadTime.components.seconds)
                + Double(loadTime.components.attoseconds) * 1e-18,
        ]
        if let tokPerSec { object["decode_tok_s"] = tokPerSec }
        if let threads = options.threads { object["threads"] = threads }
        if let blasThreads = BLAS.threads() { object["blas_threads"] = blasThreads }
        if let threadNote { object["note"] = threadNote }
        if let tokenizer { object["text"] = tokenizer.decode(result.tokens) }
        print(jsonString(object))
    } else {
        if let threadNote { print("note: \(threadNote)") }
        print("model: \(c.architecture.rawValue), \(c.layers) layers, hidden \(c.hiddenSize), "
            + "vocab \(c.vocabSize), BLAS \(BLAS.backend)")
        print("prompt: \(result.promptTokens.map(String.init).joined(separator: ","))")
        print("tokens: \(result.tokens.map(String.init).joined(separator: ","))")
        if let tokenizer {
            print("text: \(options.text!)\(tokenizer.decode(result.tokens))")
        }
        print(String(format: "prefill: %d tokens in %.2f ms", result.promptTokens.count,
            result.prefillSeconds * 1e3))
        if let tokPerSec {
            print(String(format: "decode: %d tokens in %.2f ms, %.1f tok/s",
                result.tokens.count - 1, result.decodeSeconds * 1e3, tokPerSec))
        } else {
            print("decode: no decode steps (--max-new 1), no tok/s")
        }
    }
}

do {
    try run()
} catch {
    FileHandle.standardError.write(Data("lmport: error: \(error)\n".utf8))
    exit(1)
}
