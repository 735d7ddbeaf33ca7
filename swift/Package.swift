// swift-tools-version:6.0
// LMPort: a Swift port of Llama and Phi-2 that checks itself against PyTorch reference dumps.
// No outside packages. Matrix products go through BLAS: OpenBLAS on Linux (the COpenBLAS
// system-library target, `apt-get install libopenblas-dev`), Accelerate on macOS.
import PackageDescription

let package = Package(
    name: "LMPort",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "LMPort", targets: ["LMPort"]),
        .executable(name: "lmport", targets: ["lmport"]),
    ],
    targets: [
        .systemLibrary(
            name: "COpenBLAS",
            path: "Sources/COpenBLAS",
            providers: [.apt(["libopenblas-dev"])]
        ),
        .target(
            name: "LMPort",
            dependencies: [.target(name: "COpenBLAS", condition: .when(platforms: [.linux]))]
        ),
        .executableTarget(name: "lmport", dependencies: ["LMPort"]),
        .testTarget(name: "LMPortTests", dependencies: ["LMPort"]),
    ]
)
