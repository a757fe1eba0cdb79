import CPKCS11
import Foundation
import Testing
@testable import P11ForkCore

/// The pid trace lines carry is set when the module loads, which these tests do not do: set once,
/// before any line is built (suites run in parallel).
let processIdentity: Void = { ForkDetection.pid = getpid() }()

/// Trace formatting, with the level switched for the test (these tests share Trace.level).
@Suite(.serialized) struct TraceLineTests {
    private func withLevel<T>(_ level: TraceLevel, _ body: () -> T) -> T {
        let saved = Trace.level
        Trace.level = level
        _ = processIdentity
        defer { Trace.level = saved }
        return body()
    }

    private func signLine(json: Bool) -> String {
        var line = TraceLine(json: json)
        line.header()
        line.beginCall(.C_Sign)
        line.session("session", 0x5E00_0001)
        line.length("data", UnsafeMutablePointer<UInt8>(bitPattern: 0x1000), 32)
        var outLength: CK_ULONG = 256
        line.output("signature", UnsafeMutablePointer<UInt8>(bitPattern: 0x2000), in: 512, out: &outLength, CK_RV(CKR_OK))
        line.endCall(CK_RV(CKR_OK), nanoseconds: 12_345)
        return line.text
    }

    @Test func textCallLineHasTimePidFunctionArgumentsReturnCodeAndDuration() {
        let text = withLevel(.calls) { signLine(json: false) }
        #expect(text.hasSuffix("C_Sign(session=0x5e000001, data=len 32, signature=len 512->256) = CKR_OK 12.3us\n"))
        #expect(text.contains(" p11fork[\(getpid())/"))
        #expect(text.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "#, options: .regularExpression) != nil)
    }

    /// The line of a traced `C_GetSessionInfo` as `Custom.C_GetSessionInfo` builds it.
    private func sessionInfoLine(json: Bool, rv: CK_RV = CK_RV(CKR_OK), flags: CK_FLAGS = CK_FLAGS(CKF_SERIAL_SESSION),
                                 nanoseconds: UInt64 = 21_049) -> String {
        var line = TraceLine(json: json)
        line.header()
        line.beginCall(.C_GetSessionInfo)
        line.session("session", 0x5E00_0001)
        line.key("state")
        line.name(sessionStateName(CK_STATE(CKS_RO_PUBLIC_SESSION)), orHex: CK_STATE(CKS_RO_PUBLIC_SESSION))
        line.flags("flags", flags, names: CK_FLAGS.sessionFlagNames)
        line.endCall(rv, nanoseconds: nanoseconds)
        return line.text
    }

    /// The exact text of a traced call, both formats, header included: what readers of the trace
    /// (`p11fork trace`, the doctor, people's scripts) parse. Two lines in a row, so that the
    /// second is made from the thread's header cache, and the formats alternated.
    @Test func sessionInfoLineIsExactlyThisInBothFormats() throws {
        let tid = CPKCS11_cached_tid(Int(getpid()))
        let stamp = #"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"#
        let text = #"^"# + stamp + #" p11fork\[\#(getpid())/\#(tid)\] C_GetSessionInfo\(session=0x5e000001, state=CKS_RO_PUBLIC_SESSION, flags=CKF_SERIAL_SESSION\) = CKR_OK 21\.0us\n$"#
        let json = #"^\{"time":""# + stamp + #"","pid":\#(getpid()),"tid":\#(tid),"call":"C_GetSessionInfo","args":\{"session":"0x5e000001","state":"CKS_RO_PUBLIC_SESSION","flags":"CKF_SERIAL_SESSION"\},"rv":"CKR_OK","us":21\.0\}\n$"#
        for _ in 0..<3 {
            for (isJSON, pattern) in [(false, text), (true, json), (true, json), (false, text)] {
                let line = withLevel(.calls) { sessionInfoLine(json: isJSON) }
                #expect(line.range(of: pattern, options: .regularExpression) != nil, "\(line)")
            }
        }
        // A line built while another is (a heap buffer, no header cache) is the same.
        let nested = withLevel(.calls) { () -> String in
            var outer = TraceLine(json: false)
            outer.header()
            return sessionInfoLine(json: false)
        }
        #expect(nested.range(of: text, options: .regularExpression) != nil, "\(nested)")
        // Unknown values in hex, several flags, a failure, long and short durations.
        let other = withLevel(.calls) {
            sessionInfoLine(json: false, rv: 0x8000_0123, flags: CK_FLAGS(CKF_RW_SESSION | CKF_SERIAL_SESSION) | 0x100,
                            nanoseconds: 1_234_567_891)
        }
        #expect(other.hasSuffix("flags=CKF_RW_SESSION|CKF_SERIAL_SESSION|0x100) = 0x80000123 1234567.9us\n"), "\(other)")
        let otherJSON = withLevel(.calls) { sessionInfoLine(json: true, rv: CK_RV(CKR_SESSION_HANDLE_INVALID), flags: 0, nanoseconds: 49) }
        #expect(otherJSON.hasSuffix(#""flags":"0x0"},"rv":"CKR_SESSION_HANDLE_INVALID","us":0.0}"# + "\n"), "\(otherJSON)")
    }

    /// Numbers as the C library and Swift write them, whichever way TraceLine makes them (a
    /// 32-bit hex number at once in a word, a small decimal from a table), and names of every
    /// length up to past the widths copied at once.
    @Test func numbersAndNamesAreWrittenExactly() {
        var values: [UInt] = [0, 1, 9, 10, 15, 16, 99, 100, 255, 256, 999, 1000, 0xABCDEF, 0x5E00_0001, 0x8000_0000,
                              0xFFFF_FFFF, 0x1_0000_0000, 0x1234_5678_9ABC_DEF0, UInt.max]
        var seed: UInt = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<2000 {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            values.append(seed >> (seed % 64))
        }
        for value in values {
            var line = TraceLine(json: false)
            line.appendHex(value)
            line.append(UInt8(ascii: " "))
            line.appendDecimal(value)
            #expect(line.text == "0x\(String(value, radix: 16)) \(value)")
        }
        let names: [StaticString] = ["", "a", "ab", "abc", "abcd", "abcdefg", "abcdefgh", "abcdefghijklmno",
                                     "abcdefghijklmnop", "abcdefghijklmnopq", "abcdefghijklmnopqrstuvwxyz012345",
                                     "abcdefghijklmnopqrstuvwxyz0123456", "CKR_OK", "CKS_RO_PUBLIC_SESSION"]
        for name in names {
            var line = TraceLine(json: false)
            line.append(UInt8(ascii: "<"))
            line.append(name)
            line.append(UInt8(ascii: ">"))
            #expect(line.text == "<\(name)>")
        }
    }

    @Test func jsonCallLineIsOneObject() throws {
        let text = withLevel(.calls) { signLine(json: true) }
        let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(object["call"] as? String == "C_Sign")
        #expect(object["rv"] as? String == "CKR_OK")
        #expect(object["pid"] as? Int == Int(getpid()))
        let args = try #require(object["args"] as? [String: Any])
        #expect(args["session"] as? String == "0x5e000001")
        #expect(args["data"] as? Int == 32)
    }

    /// An event's fields go into its JSON line beside the message, in the shared vocabulary; a
    /// text line is the message alone.
    @Test func jsonEventLineCarriesTheEventsFields() throws {
        func eventLine(json: Bool, _ fields: EventFields) -> String {
            var line = TraceLine(json: json)
            line.header()
            line.eventBody(kind: "fork", message: "login replayed: CKU_USER on slot 0x1 (1.2 ms)", fields: json ? fields : nil)
            return line.text
        }
        var fields = EventFields.step(.login, .ok)
        fields.nanoseconds = 1_234_567
        let json = eventLine(json: true, fields)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any], "\(json)")
        #expect(object["event"] as? String == "fork" && object["kind"] as? String == "recovery-step", "\(json)")
        #expect(object["step"] as? String == "login" && object["outcome"] as? String == "ok" && object["ms"] as? Double == 1.234, "\(json)")
        #expect(json.hasSuffix(#""kind":"recovery-step","step":"login","ms":1.234,"outcome":"ok"}"# + "\n"), "\(json)")
        let fork = eventLine(json: true, .forkDetected(parent: 42, generation: 3))
        #expect(fork.hasSuffix(#""kind":"fork-detected","parent":42,"generation":3}"# + "\n"), "\(fork)")
        let text = eventLine(json: false, fields)
        #expect(text.hasSuffix("fork: login replayed: CKU_USER on slot 0x1 (1.2 ms)\n") && !text.contains("kind"), "\(text)")
    }

    @Test func unknownReturnCodeIsPrintedInHex() {
        let text = withLevel(.calls) { () -> String in
            var line = TraceLine(json: false)
            line.beginCall(.C_Logout)
            line.endCall(0x8000_0123, nanoseconds: 1000)
            return line.text
        }
        #expect(text == "C_Logout() = 0x80000123 1.0us\n")
    }

    @Test func templateShowsNamesAndHarmlessValuesButOnlyLengthsOfSecrets() {
        var keyClass = CK_OBJECT_CLASS(CKO_SECRET_KEY)
        var token: CK_BBOOL = 1
        var label = Array("aes \"main\"".utf8)
        var value = [UInt8](repeating: 0xA5, count: 32)
        let text = withLevel(.full) { () -> String in
            withUnsafeMutableBytes(of: &keyClass) { classBytes in
                withUnsafeMutableBytes(of: &token) { tokenBytes in
                    label.withUnsafeMutableBytes { labelBytes in
                        value.withUnsafeMutableBytes { valueBytes in
                            var template = [
                                CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: classBytes.baseAddress, ulValueLen: 8),
                                CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_TOKEN), pValue: tokenBytes.baseAddress, ulValueLen: 1),
                                CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: labelBytes.baseAddress, ulValueLen: CK_ULONG(labelBytes.count)),
                                CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: valueBytes.baseAddress, ulValueLen: 32),
                            ]
                            var line = TraceLine(json: false)
                            line.template("template", &template, 4, valuesShown: true)
                            return line.text
                        }
                    }
                }
            }
        }
        #expect(text == #"template=[CKA_CLASS=CKO_SECRET_KEY, CKA_TOKEN=true, CKA_LABEL="aes \"main\"", CKA_VALUE(len 32)]"#)
        #expect(!text.lowercased().contains("a5a5"))
    }

    @Test func templateAtCallsLevelIsItsSize() {
        var attribute = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: nil, ulValueLen: 0)
        let text = withLevel(.calls) { () -> String in
            var line = TraceLine(json: false)
            line.template("template", &attribute, 1, valuesShown: true)
            return line.text
        }
        #expect(text == "template=[1 attributes]")
    }

    @Test func pinIsNeverShownNotEvenItsLength() {
        var pin = Array("123456".utf8)
        let text = withLevel(.full) { () -> String in
            var line = TraceLine(json: false)
            line.secret("pin", &pin)
            return line.text
        }
        #expect(text == "pin=hidden")
    }

    @Test func overlongLineIsCutButStillEndsWithTheReturnCode() {
        let text = withLevel(.calls) { () -> String in
            var line = TraceLine(json: false)
            line.beginCall(.C_FindObjects)
            for _ in 0..<1000 { line.number("n", 123_456_789) }
            line.endCall(CK_RV(CKR_OK), nanoseconds: 10)
            return line.text
        }
        #expect(text.count < TraceLine.capacity)
        #expect(text.hasSuffix("…) = CKR_OK 0.0us\n"))
    }
}

@Suite struct TraceTimeTests {
    @Test func civilDatesAgreeWithGmtimeAcrossYearsAndLeapDays() {
        // Every 997,331 s (about 11.5 days) from 1970 to 2100, and some edges.
        var samples = Array(stride(from: 0, to: 4_102_444_800, by: 997_331))
        samples += [951_782_400, 951_868_799, 1_709_251_199, 4_102_444_799, 1_234_567_890]
        for sample in samples {
            var t = time_t(sample)
            var parts = tm()
            gmtime_r(&t, &parts)
            let civil = TraceLine.civil(sample)
            #expect(civil.year == Int(parts.tm_year) + 1900 && civil.month == Int(parts.tm_mon) + 1 && civil.day == Int(parts.tm_mday)
                    && civil.secondOfDay == Int(parts.tm_hour) * 3600 + Int(parts.tm_min) * 60 + Int(parts.tm_sec), "\(sample)")
        }
    }

    /// The time stamp is computed, not formatted by strftime: it must agree with gmtime/strftime.
    @Test func timeStampMatchesTheCLibrary() {
        _ = processIdentity
        var line = TraceLine(json: false)
        line.header()
        let text = line.text
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        var stamp = [CChar](repeating: 0, count: 32)
        _ = strftime(&stamp, 32, "%Y-%m-%dT%H:%M", &parts)
        let expected = String(cString: stamp)
        // The same minute (a test running across a minute boundary is retried by reading again).
        if !text.hasPrefix(expected) {
            var later = time(nil)
            gmtime_r(&later, &parts)
            _ = strftime(&stamp, 32, "%Y-%m-%dT%H:%M", &parts)
            #expect(text.hasPrefix(String(cString: stamp)) || text.hasPrefix(expected), "\(text) vs \(expected)")
        }
    }
}
