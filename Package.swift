// swift-tools-version: 6.1
import PackageDescription

// libp11fork.so: the PKCS#11 module, with the Swift runtime linked in and only the three
// PKCS#11 entry points exported (see Sources/P11Fork/exports.map).
// P11FORK_SANITIZE=1 (set by scripts/sanitize.sh) drops `-z defs`: a sanitizer's runtime is
// found only when the module is loaded into a sanitized process.
let moduleLinkerFlags: [String] = [
    "-static-stdlib",
    "-Xlinker", "--version-script=\(Context.packageDirectory)/Sources/P11Fork/exports.map",
] + (Context.environment["P11FORK_SANITIZE"] == nil ? ["-Xlinker", "-z", "-Xlinker", "defs"] : [])

// Sources/ holds the product: the C edge (CPKCS11), the shared words (Vocabulary), the core
// (P11ForkCore), the exported module (P11Fork), the broker (Broker) and the command (p11fork-cli,
// installed as p11fork by scripts/install.sh). What only the tests build lives under Tests/: the test modules in
// Tests/Modules, the drivers and fuzzers in Tests/Tools.
let package = Package(
    name: "p11fork",
    products: [
        .library(name: "p11fork", type: .dynamic, targets: ["P11Fork"]),
        // The broker the module starts at the application's first fork (docs/DESIGN.md "The broker").
        .executable(name: "p11fork-broker", targets: ["p11fork-broker"]),
        .executable(name: "p11fork-conformance", targets: ["p11fork-conformance"]),
        .executable(name: "p11fork-forkcheck", targets: ["p11fork-forkcheck"]),
        .executable(name: "p11fork-forksafe", targets: ["p11fork-forksafe"]),
        .executable(name: "p11fork-secrets", targets: ["p11fork-secrets"]),
        .executable(name: "p11fork-enginefork", targets: ["p11fork-enginefork"]),
        .executable(name: "p11fork-providerfork", targets: ["p11fork-providerfork"]),
        .executable(name: "p11fork-interfaces", targets: ["p11fork-interfaces"]),
        .executable(name: "p11fork-bench", targets: ["p11fork-bench"]),
        .executable(name: "p11fork-faults", targets: ["p11fork-faults"]),
        .executable(name: "p11fork-concurrency", targets: ["p11fork-concurrency"]),
        .executable(name: "p11fork-setuid-probe", targets: ["p11fork-setuid-probe"]),
        .executable(name: "p11fork-input-fuzz", targets: ["p11fork-input-fuzz"]),
        // The command-line tool (`p11fork doctor`, `p11fork trace`). Its binary is p11fork-cli:
        // the name p11fork is the module's product; scripts/install.sh installs it as p11fork.
        .executable(name: "p11fork-cli", targets: ["p11fork-cli"]),
        // Modules built only for the tests (Tests/Modules).
        .library(name: "p11fork-test-failing", type: .dynamic, targets: ["FailingModule"]),
        .library(name: "p11fork-test-nethsm", type: .dynamic, targets: ["NetHSMModule"]),
        .library(name: "p11fork-test-faulty", type: .dynamic, targets: ["FaultyModule"]),
    ],
    dependencies: [
        // Only the command-line tool uses it; the module depends on Glibc and the standard library only.
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // The C edge: PKCS#11 2.40 (p11-kit's header) + 3.0 declarations, and tiny syscall helpers.
        .target(name: "CPKCS11"),
        // The words the module, the command and include/p11fork.h share: strategy names, trace
        // event kinds, recovery steps (generated from codegen/vocabulary.txt).
        .target(name: "Vocabulary"),
        // The proxy: loading the real module, handle tables, fork handling, tracing, the calls.
        // Exclusivity is not checked at run time: every global p11fork changes is guarded by a lock
        // or written once, and the checks cost a runtime call per access on the signing path.
        .target(name: "P11ForkCore", dependencies: ["CPKCS11", "Vocabulary"], swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"])]),
        // The exported module: the three C entry points and nothing else.
        .target(
            name: "P11Fork",
            dependencies: ["P11ForkCore", "CPKCS11"],
            exclude: ["exports.map"],
            linkerSettings: [.unsafeFlags(moduleLinkerFlags)]
        ),
        // The broker: serves the real module to the application's children with the application's rights.
        .executableTarget(
            name: "p11fork-broker",
            path: "Sources/Broker",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        // Runs one fixed call sequence against a module and prints a comparable transcript.
        .executableTarget(
            name: "p11fork-conformance",
            dependencies: ["ToolSupport"],
            path: "Tests/Tools/Conformance",
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // What the doctor's scenarios and the C test drivers share: return-code names, output lines,
        // finding a token. Part of the command (the doctor links it), so it lives beside it.
        .target(name: "ToolSupport", path: "Sources/p11fork-cli/ToolSupport"),
        // Runs one fork scenario against a module (directly or through p11fork); in C, so the
        // driver's own runtime cannot blur what a forked child sees.
        .executableTarget(
            name: "p11fork-forkcheck",
            dependencies: ["ToolSupport", "CPKCS11"],
            path: "Tests/Tools/ForkCheck",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        // The fork-safe scenarios: session objects and operations in progress in a forked child.
        .executableTarget(
            name: "p11fork-forksafe",
            dependencies: ["ToolSupport", "CPKCS11"],
            path: "Tests/Tools/ForkSafe",
            cSettings: [.headerSearchPath("../../Modules/NetHSM/include")],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // A logged-in process whose memory the secrets tests inspect (where does the PIN live?).
        .executableTarget(
            name: "p11fork-secrets",
            path: "Tests/Tools/Secrets",
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // A forking program signing through OpenSSL's pkcs11 engine (libp11), like nginx workers.
        .executableTarget(
            name: "p11fork-enginefork",
            path: "Tests/Tools/EngineFork",
            linkerSettings: [.linkedLibrary("crypto")]
        ),
        // A forking program signing through pkcs11-provider (OpenSSL 3), the key from OSSL_STORE.
        .executableTarget(
            name: "p11fork-providerfork",
            dependencies: ["ProviderScenario"],
            path: "Tests/Tools/ProviderFork"
        ),
        // The 3.0 interface calls and 3.0 functions through a 3.0 list, and the 3.2 functions through a
        // 3.2 list (the NetHSM test module's header names its KEM), as a comparable transcript.
        .executableTarget(
            name: "p11fork-interfaces",
            dependencies: ["CPKCS11"],
            path: "Tests/Tools/Interfaces",
            cSettings: [.headerSearchPath("../../Modules/NetHSM/include")],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // Measurements for scripts/bench.sh (direct and through p11fork, side by side).
        // The fault scenarios: a real module that fails in a parent or in a forked child.
        .executableTarget(
            name: "p11fork-faults",
            dependencies: ["ToolSupport"],
            path: "Tests/Tools/Faults",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        .executableTarget(
            name: "p11fork-bench",
            path: "Tests/Tools/Bench",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        // Many threads, forks among them, and C_Finalize racing them (scenarios in the file's header).
        .executableTarget(
            name: "p11fork-concurrency",
            dependencies: ["ToolSupport"],
            path: "Tests/Tools/Concurrency",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        // Untrusted text into the settings parsers and the trace reader (scripts/fuzz-inputs.sh; tests).
        .executableTarget(
            name: "p11fork-input-fuzz",
            dependencies: ["P11ForkCore", "TraceReader"],
            path: "Tests/Tools/InputFuzz",
            exclude: ["seeds"]
        ),
        // A program that loads a module as a setuid program does (the hostile-inputs tests).
        .executableTarget(
            name: "p11fork-setuid-probe",
            dependencies: ["ToolSupport"],
            path: "Tests/Tools/SetuidProbe",
            linkerSettings: [.linkedLibrary("dl")]
        ),
        .target(name: "FailingModule", path: "Tests/Modules/FailingModule"),
        // Wraps a real module and answers the faults a control file names (its header says how).
        .target(name: "FaultyModule", path: "Tests/Modules/FaultyModule", linkerSettings: [.linkedLibrary("dl")]),
        // Behaves like a network-HSM client that knows nothing about fork (its README says how).
        // Its 3.2 declarations are p11fork's own (the CPKCS11 header only: nothing of that target is linked in).
        .target(name: "NetHSMModule", path: "Tests/Modules/NetHSM", exclude: ["selftest", "README.md"],
                cSettings: [.headerSearchPath("../../../Sources/CPKCS11/include")], linkerSettings: [.linkedLibrary("crypto")]),
        // The command-line tool: the doctor and the trace reader.
        .executableTarget(
            name: "p11fork-cli",
            dependencies: ["DoctorScenarios", "ProviderScenario", "TraceReader", "Vocabulary", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/p11fork-cli",
            exclude: ["DoctorScenarios", "ProviderScenario", "ToolSupport", "TraceReader"]
        ),
        // A forking program on OpenSSL 3's pkcs11-provider (the doctor's --consumer provider, and a test driver).
        .target(
            name: "ProviderScenario",
            path: "Sources/p11fork-cli/ProviderScenario",
            linkerSettings: [.linkedLibrary("crypto")]
        ),
        // Reading a trace file (`p11fork trace`): a library of its own, so that the input fuzzer
        // drives the same code as the command.
        .target(name: "TraceReader", dependencies: ["Vocabulary"], path: "Sources/p11fork-cli/TraceReader"),
        // The doctor's fork scenarios, in C (run in a helper process the doctor starts and watches).
        .target(
            name: "DoctorScenarios",
            dependencies: ["CPKCS11", "ToolSupport"],
            path: "Sources/p11fork-cli/DoctorScenarios",
            linkerSettings: [.linkedLibrary("dl")]
        ),
        .testTarget(name: "P11ForkCoreTests", dependencies: ["P11ForkCore"]),
        .testTarget(name: "P11ForkTests"),
    ]
)
