import Foundation
import Testing

/// The project carries its own design: every comment or document that sends the reader to a
/// section of one of its documents (`docs/FORK.md "The broker"`) names a section that exists, and
/// none sends the reader to notes the repository does not have.
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
        let outside = Self.files().filter { file in
            guard !file.hasSuffix("/DocsTests.swift"), let text = try? String(contentsOf: Self.root.appendingPathComponent(file), encoding: .utf8) else { return false }
            return ["MODULES-AFTER-FORK", "SWIFT-MODULE-NOTES", "STYLE.md", " NOTES.md"].contains { text.contains($0) }
        }
        #expect(outside.isEmpty, "files that name notes outside the repository: \(outside)")
        #expect(missing.isEmpty, "sections that do not exist:\n\(missing.joined(separator: "\n"))")
    }
}
