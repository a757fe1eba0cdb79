import Foundation
import Testing

/// The project carries its own design: every comment or document that sends the reader to a
/// section of one of its documents (`docs/FORK.md "The broker"`) names a section that exists, and
/// every document named anywhere is in the repository.
@Suite struct DocsTests {
    static let root = Products.packageRoot

    /// The headings of each of the project's documents.
    static func headings() throws -> [String: [String]] {
        var found: [String: [String]] = [:]
        let docs = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("docs").path)
            .filter { $0.hasSuffix(".md") }.map { "docs/" + $0 } + ["README.md", "BENCHMARKS.md"]
        for doc in docs {
            let text = try String(contentsOf: root.appendingPathComponent(doc), encoding: .utf8)
            found[doc] = text.split(separator: "\n").compactMap { line in
                line.firstMatch(of: /^#+\s+(.*)$/).map { String($0.output.1).trimmingCharacters(in: .whitespaces) }
            }
        }
        return found
    }

    /// Source and text files under the folders the project writes.
    static func files() -> [String] {
        var paths: [String] = []
        for folder in ["Sources", "Tests", "scripts", "docs", "include", "examples", "codegen"] {
            guard let walk = FileManager.default.enumerator(atPath: root.appendingPathComponent(folder).path) else { continue }
            for case let path as String in walk where [".swift", ".c", ".h", ".sh", ".md", ".py", ".conf", ".cnf"].contains(where: path.hasSuffix) {
                paths.append("\(folder)/\(path)")
            }
        }
        return paths + ["README.md", "BENCHMARKS.md"]
    }

    @Test func everySectionNamedExists() throws {
        let headings = try Self.headings()
        var missing: [String] = []
        var checked = 0
        for file in Self.files() {
            guard let raw = try? String(contentsOf: Self.root.appendingPathComponent(file), encoding: .utf8) else { continue }
            // A reference may wrap onto the next comment or text line.
            let text = raw.replacing(/\n\s*(?:\/\/+|\*|#)?\s*/, with: " ")
            for match in text.matches(of: /((?:docs\/)?[A-Z]+\.md),?\s+"([^"]+)"/) {
                var doc = String(match.output.1)
                if !doc.hasPrefix("docs/"), headings["docs/" + doc] != nil { doc = "docs/" + doc }
                guard let sections = headings[doc] else { continue }
                checked += 1
                let section = String(match.output.2)
                if !sections.contains(where: { $0 == section || $0.hasPrefix(section) }) {
                    missing.append("\(file): \(doc) \"\(section)\"")
                }
            }
        }
        #expect(checked > 50, "references found: \(checked)")
        // Every document named anywhere is one the repository has.
        let documents = Set(Self.files().filter { $0.hasSuffix(".md") }.map { URL(fileURLWithPath: $0).lastPathComponent })
        var outside: [String] = []
        for file in Self.files() {
            guard let text = try? String(contentsOf: Self.root.appendingPathComponent(file), encoding: .utf8) else { continue }
            for match in text.matches(of: /\b([A-Za-z0-9_-]+\.md)\b/) where !documents.contains(String(match.output.1)) {
                outside.append("\(file): \(match.output.1)")
            }
        }
        #expect(outside.isEmpty, "documents named that the repository does not have: \(outside)")
        #expect(missing.isEmpty, "sections that do not exist:\n\(missing.joined(separator: "\n"))")
    }
}
