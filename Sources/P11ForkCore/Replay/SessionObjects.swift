import CPKCS11

/// How a session object was made, kept so that a child can make it again (docs/DESIGN.md "Recovery
/// in the child", step 5). Only what can be replayed exactly is kept: an object made by
/// C_CreateObject, C_CopyObject, C_UnwrapKey, C_DeriveKey, or (3.2) C_UnwrapKeyAuthenticated and
/// C_DecapsulateKey; one made by C_GenerateKey, C_GenerateKeyPair or C_EncapsulateKey holds a
/// random key no replay could give again, and is kept as lost.
final class ObjectRecipe {
    enum Origin {
        case created(KeptTemplate)
        case copied(source: CK_OBJECT_HANDLE, KeptTemplate)
        case unwrapped(KeptMechanism, key: CK_OBJECT_HANDLE, wrapped: KeptBytes?, KeptTemplate)
        case derived(KeptMechanism, base: CK_OBJECT_HANDLE, KeptTemplate)
        case unwrappedAuthenticated(KeptMechanism, key: CK_OBJECT_HANDLE, wrapped: KeptBytes?, associated: KeptBytes?, KeptTemplate)
        case decapsulated(KeptMechanism, key: CK_OBJECT_HANDLE, ciphertext: KeptBytes?, KeptTemplate)
        case lost(String)

        var byteCount: Int {
            switch self {
            case .created(let template), .copied(_, let template): template.byteCount
            case .unwrapped(let mechanism, _, let wrapped, let template): mechanism.byteCount + (wrapped?.count ?? 0) + template.byteCount
            case .derived(let mechanism, _, let template): mechanism.byteCount + template.byteCount
            case .unwrappedAuthenticated(let mechanism, _, let wrapped, let associated, let template):
                mechanism.byteCount + (wrapped?.count ?? 0) + (associated?.count ?? 0) + template.byteCount
            case .decapsulated(let mechanism, _, let ciphertext, let template): mechanism.byteCount + (ciphertext?.count ?? 0) + template.byteCount
            case .lost: 0
            }
        }
    }

    /// The (virtual) session that made it: the object lives as long as that session.
    let session: CK_SESSION_HANDLE
    let origin: Origin
    /// C_SetAttributeValue calls made on it since, in order.
    var changes: [KeptTemplate] = []
    var reserved: Int

    init(session: CK_SESSION_HANDLE, origin: Origin, reserved: Int) {
        self.session = session
        self.origin = origin
        self.reserved = reserved
    }
}

enum SessionObjects {
    // Guarded by Records.lock.
    nonisolated(unsafe) static var recipes: [CK_OBJECT_HANDLE: ObjectRecipe] = [:]

    // MARK: recording, after the call succeeded and the new handle was exposed (the generated
    // forwarders call these: `@created` in codegen/pkcs11-functions.txt)

    static func created(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        record(object, session) { KeptTemplate.copy(template, count).map { .created($0) } }
    }

    static func copied(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, from source: CK_OBJECT_HANDLE,
                       _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        record(object, session) { KeptTemplate.copy(template, count).map { .copied(source: source, $0) } }
    }

    static func unwrapped(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                          key: CK_OBJECT_HANDLE, wrapped: UnsafeMutablePointer<CK_BYTE>?, _ wrappedLength: CK_ULONG,
                          _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        record(object, session) {
            switch KeptMechanism.copy(mechanism) {
            case .notReplayable(let why): return .lost(why)
            case .kept(let kept):
                guard let template = KeptTemplate.copy(template, count), let bytes = keep(wrapped, wrappedLength) else { return nil }
                return .unwrapped(kept, key: key, wrapped: bytes, template)
            }
        }
    }

    /// After C_UnwrapKeyAuthenticated (3.2): C_UnwrapKey's inputs and the associated data.
    static func unwrappedAuthenticated(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                                       key: CK_OBJECT_HANDLE, wrapped: UnsafeMutablePointer<CK_BYTE>?, _ wrappedLength: CK_ULONG,
                                       _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                                       associated: UnsafeMutablePointer<CK_BYTE>?, _ associatedLength: CK_ULONG) {
        record(object, session) {
            switch KeptMechanism.copy(mechanism) {
            case .notReplayable(let why): return .lost(why)
            case .kept(let kept):
                guard let template = KeptTemplate.copy(template, count), let bytes = keep(wrapped, wrappedLength),
                      let data = keep(associated, associatedLength) else { return nil }
                return .unwrappedAuthenticated(kept, key: key, wrapped: bytes, associated: data, template)
            }
        }
    }

    /// After C_DecapsulateKey (3.2): the same private key and ciphertext give the same key again.
    static func decapsulated(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                             key: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                             ciphertext: UnsafeMutablePointer<CK_BYTE>?, _ ciphertextLength: CK_ULONG) {
        record(object, session) {
            switch KeptMechanism.copy(mechanism) {
            case .notReplayable(let why): return .lost(why)
            case .kept(let kept):
                guard let template = KeptTemplate.copy(template, count), let bytes = keep(ciphertext, ciphertextLength) else { return nil }
                return .decapsulated(kept, key: key, ciphertext: bytes, template)
            }
        }
    }

    /// A copy of an input buffer: .some(nil) for an empty one, nil when there is no memory.
    private static func keep(_ bytes: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> KeptBytes?? {
        guard length > 0 else { return .some(nil) }
        return KeptBytes(copying: bytes, count: Int(length)).map { .some($0) }
    }

    static func derived(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                        base: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        record(object, session) {
            switch KeptMechanism.copy(mechanism) {
            case .notReplayable(let why): return .lost(why)
            case .kept(let kept): return KeptTemplate.copy(template, count).map { .derived(kept, base: base, $0) }
            }
        }
    }

    static func generated(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, by function: String) {
        record(object, session) { .lost("it was made by \(function), and a random key cannot be made again") }
    }

    /// After C_SetAttributeValue: a session object's change is kept to be made again; a token
    /// object's identity is read again (its label or ID may have changed).
    static func changed(_ object: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        let known = Records.lock.withLock { recipes[object] != nil }
        if known {
            let copy = KeptTemplate.copy(template, count)
            let replaced = Records.lock.withLock { () -> ObjectRecipe? in
                guard let recipe = recipes[object] else { return nil }
                if let copy, ReplayBudget.reserveLocked(copy.byteCount) {
                    recipe.changes.append(copy)
                    recipe.reserved += copy.byteCount
                    return nil
                }
                ReplayBudget.releaseLocked(recipe.reserved)
                recipes[object] = ObjectRecipe(session: recipe.session, origin: .lost("a change made to it by C_SetAttributeValue could not be kept (\(copy == nil ? "no memory" : "P11FORK_REPLAY_LIMIT reached"))"), reserved: 0)
                return recipe
            }
            _ = replaced  // its kept values are wiped here, outside the lock
        }
        if let bound = Sessions.lookup(session), let functions = Core.functions,
           let identity = ObjectIdentity.read(functions, session: bound.real, object: Objects.view.real(object, epoch: Core.epoch) ?? (HandleValues.translated ? 0 : object)),
           Records.object(object) != nil {
            Records.forgetObject(object)
            Records.noteObject(object, identity)
        }
    }

    private static func record(_ object: CK_OBJECT_HANDLE, _ session: CK_SESSION_HANDLE, _ make: () -> ObjectRecipe.Origin?) {
        guard !ReplayBudget.isOff, object != CK_OBJECT_HANDLE(CK_INVALID_HANDLE),
              let identity = Records.object(object), !identity.isTokenObject else { return }
        let origin = make() ?? .lost("what made it could not be kept (no memory)")
        let size = origin.byteCount
        Records.lock.withLock {
            if let old = recipes[object] { ReplayBudget.releaseLocked(old.reserved) }
            if ReplayBudget.reserveLocked(size) {
                recipes[object] = ObjectRecipe(session: session, origin: origin, reserved: size)
            } else {
                recipes[object] = ObjectRecipe(session: session, origin: .lost("p11fork's replay memory (P11FORK_REPLAY_LIMIT, \(ReplayBudget.limit) bytes) was full when it was made"), reserved: 0)
            }
        }
    }

    /// C_DestroyObject.
    static func forget(_ object: CK_OBJECT_HANDLE) {
        Records.lock.withLock {
            if let recipe = recipes.removeValue(forKey: object) { ReplayBudget.releaseLocked(recipe.reserved) }
        }
    }

    /// Sessions closed: the module destroyed the session objects they made. Returns their
    /// handles (to be released). Under Records.lock.
    static func forgetLocked(sessions: Set<CK_SESSION_HANDLE>) -> [CK_OBJECT_HANDLE] {
        let gone = recipes.filter { sessions.contains($0.value.session) }
        for (object, recipe) in gone {
            recipes[object] = nil
            ReplayBudget.releaseLocked(recipe.reserved)
        }
        return Array(gone.keys)
    }

    static func forgetAllLocked() {
        for recipe in recipes.values { ReplayBudget.releaseLocked(recipe.reserved) }
        recipes.removeAll()
    }

    static func recipe(_ object: CK_OBJECT_HANDLE) -> ObjectRecipe? {
        Records.lock.withLock { recipes[object] }
    }

    // MARK: in a child

    /// Guarded by Recovery.lock: the epoch in which every session object was made again.
    nonisolated(unsafe) static var allRemadeEpoch: UInt = 0

    /// Before a search in a child: every session object of the parent is made again first,
    /// since any of them may match (PKCS#11 3.0: the child has its own copy of them all).
    static func remakeAll() {
        guard ForkDetection.generation > 0, allRemadeEpoch != Core.epoch else { return }
        Recovery.lock.withLock {
            guard allRemadeEpoch != Core.epoch else { return }
            allRemadeEpoch = Core.epoch
            let pending = Records.lock.withLock { Array(recipes.keys) }.sorted()
            for object in pending where Objects.view.real(object, epoch: Core.epoch) == nil {
                var failure = CK_RV(CKR_OK)
                _ = Recovery.object(object, &failure)
            }
        }
    }

    enum Remade {
        case remade(CK_OBJECT_HANDLE, String)
        case already(CK_OBJECT_HANDLE)
        case lost(String)
    }

    /// Makes a session object of the parent again in this child's module. Under Recovery.lock.
    static func remake(_ virtual: CK_OBJECT_HANDLE, _ recipe: ObjectRecipe, _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>,
                       _ failure: inout CK_RV) -> Remade {
        let result = attempt(virtual, recipe, functions, &failure)
        // Lost for good in this child (Recovery.lost): the values kept to make it are wiped now.
        if case .lost = result { forget(virtual) }
        return result
    }

    private static func attempt(_ virtual: CK_OBJECT_HANDLE, _ recipe: ObjectRecipe, _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>,
                                _ failure: inout CK_RV) -> Remade {
        let invalid = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        if case .lost(let why) = recipe.origin { return .lost(why) }
        let session = Recovery.session(recipe.session, &failure)
        guard failure == CKR_OK, session != CK_SESSION_HANDLE(CK_INVALID_HANDLE) else {
            return .lost("the session 0x\(Format.hex(recipe.session)) that made it could not be re-opened")
        }
        // Re-opening the session replays its operations, which may have needed this very
        // object (a key of an operation in progress): then it exists already.
        if let real = Objects.view.real(virtual, epoch: Core.epoch) { return .already(real) }
        func resolve(_ object: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE? {
            var failure = CK_RV(CKR_OK)
            let real = Recovery.object(object, &failure)
            return failure == CKR_OK && real != invalid ? real : nil
        }
        let notSupported = CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        var real = invalid
        let rv: CK_RV
        let how: String
        switch recipe.origin {
        case .created(let template):
            how = "C_CreateObject"
            rv = template.withTemplate { functions.pointee.C_CreateObject?(session, $0, $1, &real) ?? notSupported }
        case .copied(let source, let template):
            guard let realSource = resolve(source) else { return .lost("the object 0x\(Format.hex(source)) it was copied from is lost in this child") }
            how = "C_CopyObject from 0x\(Format.hex(source))"
            rv = template.withTemplate { functions.pointee.C_CopyObject?(session, realSource, $0, $1, &real) ?? notSupported }
        case .unwrapped(let mechanism, let key, let wrapped, let template):
            guard let realKey = resolve(key) else { return .lost("its unwrapping key 0x\(Format.hex(key)) is lost in this child") }
            how = "C_UnwrapKey with \(mechanism.name), unwrapping key 0x\(Format.hex(key))"
            let result = mechanism.withMechanism(resolve: resolve) { pointer in
                template.withTemplate {
                    functions.pointee.C_UnwrapKey?(session, pointer, realKey, wrapped?.pointer, CK_ULONG(wrapped?.count ?? 0), $0, $1, &real) ?? notSupported
                }
            }
            guard let result else { return .lost("a key named in its \(mechanism.name) parameter is lost in this child") }
            rv = result
        case .derived(let mechanism, let base, let template):
            guard let realBase = resolve(base) else { return .lost("its base key 0x\(Format.hex(base)) is lost in this child") }
            how = "C_DeriveKey with \(mechanism.name), base key 0x\(Format.hex(base))"
            let result = mechanism.withMechanism(resolve: resolve) { pointer in
                template.withTemplate { functions.pointee.C_DeriveKey?(session, pointer, realBase, $0, $1, &real) ?? notSupported }
            }
            guard let result else { return .lost("a key named in its \(mechanism.name) parameter is lost in this child") }
            rv = result
        case .unwrappedAuthenticated(let mechanism, let key, let wrapped, let associated, let template):
            guard let realKey = resolve(key) else { return .lost("its unwrapping key 0x\(Format.hex(key)) is lost in this child") }
            how = "C_UnwrapKeyAuthenticated with \(mechanism.name), unwrapping key 0x\(Format.hex(key))"
            let result = mechanism.withMechanism(resolve: resolve) { pointer in
                template.withTemplate {
                    functions.pointee.C_UnwrapKeyAuthenticated?(session, pointer, realKey, wrapped?.pointer, CK_ULONG(wrapped?.count ?? 0), $0, $1,
                                                                associated?.pointer, CK_ULONG(associated?.count ?? 0), &real) ?? notSupported
                }
            }
            guard let result else { return .lost("a key named in its \(mechanism.name) parameter is lost in this child") }
            rv = result
        case .decapsulated(let mechanism, let key, let ciphertext, let template):
            guard let realKey = resolve(key) else { return .lost("its private key 0x\(Format.hex(key)) is lost in this child") }
            how = "C_DecapsulateKey with \(mechanism.name), private key 0x\(Format.hex(key))"
            let result = mechanism.withMechanism(resolve: resolve) { pointer in
                template.withTemplate {
                    functions.pointee.C_DecapsulateKey?(session, pointer, realKey, $0, $1, ciphertext?.pointer, CK_ULONG(ciphertext?.count ?? 0), &real) ?? notSupported
                }
            }
            guard let result else { return .lost("a key named in its \(mechanism.name) parameter is lost in this child") }
            rv = result
        case .lost(let why):
            return .lost(why)
        }
        guard rv == CKR_OK else { return .lost("making it again (\(how)) answered \(Format.name(rv))") }
        var changes = ""
        for change in Records.lock.withLock({ recipe.changes }) {
            let rv = change.withTemplate { functions.pointee.C_SetAttributeValue?(session, real, $0, $1) ?? notSupported }
            changes = rv == CKR_OK ? ", \(recipe.changes.count) C_SetAttributeValue change(s) made again" : ", a C_SetAttributeValue change answered \(Format.name(rv))"
            if rv != CKR_OK { break }
        }
        return .remade(real, how + changes)
    }
}
