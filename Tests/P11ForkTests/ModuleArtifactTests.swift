import XCTest

/// What libp11fork.so is as a file: the properties that let it be copied anywhere and loaded
/// by anything.
final class ModuleArtifactTests: XCTestCase {
    func testExportsExactlyThePKCS11EntryPoints() throws {
        let result = try runProgram("/usr/bin/nm", ["-D", "--defined-only", Products.module])
        XCTAssertEqual(result.status, 0, result.stderr)
        // Global symbols are the ones another image can bind to (upper-case type letters).
        let exported = result.stdout.split(separator: "\n").compactMap { line -> String? in
            let fields = line.split(separator: " ")
            guard fields.count == 3, let type = fields[1].first, type.isUppercase else { return nil }
            return String(fields[2])
        }
        XCTAssertEqual(exported.sorted(), ["C_GetFunctionList", "C_GetInterface", "C_GetInterfaceList"])
    }

    func testNeedsNoSwiftRuntimeLibraries() throws {
        let result = try runProgram("/usr/bin/ldd", [Products.module])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertFalse(result.stdout.lowercased().contains("swift"), result.stdout)
        XCTAssertFalse(result.stdout.contains("not found"), result.stdout)
        XCTAssertFalse(result.stdout.contains("p11-kit"), "the header only is used, not libp11-kit: \(result.stdout)")
    }

    func testHasNoFoundationInside() throws {
        let result = try runProgram("/usr/bin/nm", [Products.module])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertFalse(result.stdout.contains("$s10Foundation"), "Foundation symbols found in the module")
        XCTAssertFalse(result.stdout.contains("$s20FoundationEssentials"), "FoundationEssentials symbols found in the module")
    }

    func testPublicHeaderCompilesWithAPKCS11Header() throws {
        let source = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-header-\(UUID().uuidString).c")
        defer { try? FileManager.default.removeItem(at: source) }
        try """
        #include <p11-kit-1/p11-kit/pkcs11.h>
        #include "p11fork.h"
        int main(void) { CK_FUNCTION_LIST_PTR list; return C_GetFunctionList(&list) == CKR_OK ? 0 : 1; }
        """.write(to: source, atomically: true, encoding: .utf8)
        let include = Products.packageRoot.appendingPathComponent("include").path
        let result = try runProgram("/usr/bin/cc", ["-fsyntax-only", "-Wall", "-Werror", "-I", include, source.path])
        XCTAssertEqual(result.status, 0, result.output)
    }
}
