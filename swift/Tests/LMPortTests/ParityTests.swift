// Parity of the Swift port with PyTorch, in the manner of llm.c's test_gpt2: labkit writes
// reference dumps (transformers in float32) and these tests fail outside the tolerances below.
//
// The fixtures folder comes from the environment variable LMPORT_FIXTURES, filled by
//     python -c "from labkit.ports import swift; swift.prepare_fixtures('build/lmport-fixtures')"
// Without it every test fails (it does not skip): a parity suite that passes with no reference
// data would be a test that cannot fail.
import Foundation
import LMPort
import XCTest

/// The acceptance: |logit - reference| <= 1e-4 over the first 64 steps (float32 reordering
/// noise, no more), and every greedy token equal to the reference's over all steps in the dump
/// (256), so a user of the port sees the very text PyTorch would write.
let logitTolerance: Float = 1e-4
let logitSteps = 64
/// Hidden states after each layer: |h - reference| <= 1e-4 * max(1, max |reference|) per layer
/// (the residual stream's scale grows with depth; float32 error grows with it).
let hiddenRelativeTolerance: Float = 1e-4

struct Manifest: Decodable {
    struct Case: Decodable {
        let name: String
        let model: String
        let dump: String
        let arch: String
        let dtype: String
    }
    let version: Int
    let dtypes: String
    let tokenizers: String?
    let cases: [Case]
}

struct TokenizerCases: Decodable {
    struct Case: Decodable {
        let tokenizer: String
        let texts: [String]
        let ids: [[Int]]
    }
    let cases: [Case]
}

func loadFixtures() throws -> (URL, Manifest) {
    guard let path = ProcessInfo.processInfo.environment["LMPORT_FIXTURES"], !path.isEmpty else {
        throw LMPortError(
            "LMPORT_FIXTURES is not set. Write the fixtures with "
                + "`python -c \"from labkit.ports import swift; swift.prepare_fixtures('build/lmport-fixtures')\"` "
                + "and run `LMPORT_FIXTURES=$PWD/build/lmport-fixtures swift test`")
    }
    let root = URL(fileURLWithPath: path)
    let manifestURL = root.appendingPathComponent("manifest.json")
    guard let data = try? Data(contentsOf: manifestURL) else {
        throw LMPortError("\(manifestURL.path) is missing: LMPORT_FIXTURES must point at a folder "
            + "written by labkit.ports.swift.prepare_fixtures")
    }
    let manifest = try JSONDecoder().decode(Manifest.self, from: data)
    guard manifest.version == 1 else {
        throw LMPortError("\(manifestURL.path): fixtures version \(manifest.version); expected 1")
    }
    guard !manifest.cases.isEmpty else { throw LMPortError("\(manifestURL.path): no cases") }
    return (root, manifest)
}

func maxAbsDiff(_ a: ArraySlice<Float>, _ b: ArraySlice<Float>) -> Float {
    var worst: Float = 0
    for (x, y) in zip(a, b) {
        let d = abs(x - y)
        if d > worst || d.isNaN { worst = d.isNaN ? .infinity : d }
    }
    return worst
}

final class ParityTests: XCTestCase {
    /// The safetensors reader converts F16 and BF16 exactly (bit for bit) to float32.
    func testDtypeConversionIsExact() throws {
        let (root, manifest) = try loadFixtures()
        let file = try SafetensorsFile(url: root.appendingPathComponent(manifest.dtypes))
        for (stored, expected) in [("f32", "f32"), ("f16", "f16_expected"), ("bf16", "bf16_expected")] {
            let got = try file.tensor(stored).array
            let want = try file.tensor(expected).array
            XCTAssertEqual(got.count, want.count, stored)
            for (i, (g, w)) in zip(got, want).enumerated() {
                XCTAssertEqual(g.bitPattern, w.bitPattern, "\(stored)[\(i)]: got \(g), expected \(w)")
            }
        }
    }

    /// Every case: logits, per-layer hidden states and greedy tokens against the reference.
    func testParityWithPyTorchReference() throws {
        let (_, manifest) = try loadFixtures()
        for testCase in manifest.cases {
            let model = try loadModel(directory: URL(fileURLWithPath: testCase.model))
            let ref = try RefDump(url: URL(fileURLWithPath: testCase.dump))
            XCTAssertEqual(ref.vocabSize, model.config.vocabSize, "\(testCase.name): vocab")
            XCTAssertEqual(ref.hiddenSize, model.config.hiddenSize, "\(testCase.name): hidden size")
            let run = try generateGreedy(
                model: model, prompt: ref.promptTokens, maxNew: ref.steps, keepLogits: true,
                keepHidden: true)

            // Greedy agreement over every step.
            let agree = zip(run.tokens, ref.greedyTokens).filter { $0 == $1 }.count
            let firstMismatch = zip(run.tokens, ref.greedyTokens).enumerated()
                .first { $0.element.0 != $0.element.1 }?.offset
            XCTAssertEqual(
                agree, ref.steps,
                "\(testCase.name): greedy agreement \(agree)/\(ref.steps), first mismatch at step "
                    + "\(firstMismatch.map(String.init) ?? "-") (reference's smallest top-2 margin "
                    + "\(ref.meta?.minTop2Margin.map { String($0) } ?? "?"))")

            // Logits over the first logitSteps steps (all steps are reported).
            var worstChecked: Float = 0
            var worstAll: Float = 0
            for step in 0..<ref.steps {
                let refRow = ref.logits[(step * ref.vocabSize)..<((step + 1) * ref.vocabSize)]
                let err = maxAbsDiff(run.logits[step][...], refRow)
                worstAll = max(worstAll, err)
                if step < logitSteps { worstChecked = max(worstChecked, err) }
            }
            XCTAssertLessThanOrEqual(
                worstChecked, logitTolerance,
                "\(testCase.name): max |logit diff| over \(min(logitSteps, ref.steps)) steps")

            // Hidden states after each recorded layer, every position.
            var layerErrors: [String] = []
            for (k, layer) in ref.layerIndices.enumerated() {
                let count = ref.positions * ref.hiddenSize
                let refLayer = ref.hidden[(k * count)..<((k + 1) * count)]
                let ours = run.hidden[layer]
                XCTAssertEqual(ours.count, count, "\(testCase.name): layer \(layer) positions")
                guard ours.count == count else { continue }
                let scale = max(1, refLayer.map { abs($0) }.max() ?? 1)
                let err = maxAbsDiff(ours[...], refLayer)
                layerErrors.append(String(format: "%d:%.2e", layer, err))
                XCTAssertLessThanOrEqual(
                    err, hiddenRelativeTolerance * scale,
                    "\(testCase.name): hidden state after layer \(layer) (scale \(scale))")
            }
            print(
                "parity \(testCase.name) (\(testCase.arch), \(testCase.dtype)): greedy \(agree)/\(ref.steps), "
                    + String(format: "max|dlogit| %.2e (first %d steps) %.2e (all)", worstChecked,
                        logitSteps, worstAll)
                    + ", hidden " + layerErrors.joined(separator: " "))
        }
    }

    /// Teacher forcing with the reference's own tokens gives the same logits as free greedy
    /// decoding when the two agree (the path notebook 04 uses after fp16 runs diverge).
    func testTeacherForcingFollowsForcedTokens() throws {
        let (_, manifest) = try loadFixtures()
        let testCase = manifest.cases[0]
        let model = try loadModel(directory: URL(fileURLWithPath: testCase.model))
        let ref = try RefDump(url: URL(fileURLWithPath: testCase.dump))
        let steps = min(16, ref.steps)
        let forced = Array(ref.greedyTokens.prefix(steps - 1).map { ($0 + 1) % ref.vocabSize })
        let free = try generateGreedy(model: model, prompt: ref.promptTokens, maxNew: steps, keepLogits: true)
        let pushed = try generateGreedy(
            model: model, prompt: ref.promptTokens, maxNew: steps, forced: forced, keepLogits: true)
        XCTAssertEqual(free.logits[0], pushed.logits[0], "step 0 sees only the prompt")
        XCTAssertNotEqual(free.logits[1], pushed.logits[1], "step 1 must see the forced token")
    }

    /// The Swift BPE tokenizer gives the same ids as the `tokenizers` library on a test corpus
    /// (unicode, digits, whitespace runs, contractions, added tokens), and decodes them back.
    func testTokenizerMatchesTokenizersLibrary() throws {
        let (root, manifest) = try loadFixtures()
        guard let file = manifest.tokenizers else {
            throw LMPortError("manifest.json lists no tokenizer cases: rewrite the fixtures")
        }
        let data = try Data(contentsOf: root.appendingPathComponent(file))
        let cases = try JSONDecoder().decode(TokenizerCases.self, from: data).cases
        XCTAssertFalse(cases.isEmpty, "no tokenizer cases")
        for testCase in cases {
            let tokenizer = try BPETokenizer(url: URL(fileURLWithPath: testCase.tokenizer))
            let specialPrefix = tokenizer.decode(tokenizer.encode(""), skipSpecial: false)
            var agree = 0
            for (text, want) in zip(testCase.texts, testCase.ids) {
                let got = tokenizer.encode(text)
                XCTAssertEqual(got, want, "\(testCase.tokenizer): \"\(text)\"")
                if got == want { agree += 1 }
                XCTAssertEqual(tokenizer.decode(want, skipSpecial: false), specialPrefix + text)
            }
            print("tokenizer \(testCase.tokenizer): \(agree)/\(testCase.texts.count) texts identical")
        }
    }

    /// A broken model folder gets an error naming the file.
    func testMissingConfigNamesTheFile() throws {
        let empty = FileManager.default.temporaryDirectory
            .appendingPathComponent("lmport-empty-\(ProcessInfo.processInfo.processIdentifier)")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: empty) }
        XCTAssertThrowsError(try loadModel(directory: empty)) { error in
            XCTAssertTrue("\(error)".contains("config.json"), "\(error)")
        }
    }

    /// The KV cache refuses to overflow instead of writing past its allocation.
    func testCacheCapacityIsEnforced() throws {
        let (_, manifest) = try loadFixtures()
        let model = try loadModel(directory: URL(fileURLWithPath: manifest.cases[0].model))
        let cache = model.makeCache(capacity: 2)
        _ = try model.forward([1, 2], cache: cache, recorder: nil)
        XCTAssertThrowsError(try model.forward([3], cache: cache, recorder: nil))
    }
}
