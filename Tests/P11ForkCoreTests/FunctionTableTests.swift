import CPKCS11
import Testing
@testable import P11ForkCore

/// `Function`'s order is the order of CK_FUNCTION_LIST_3_2's entries: `Call` finds whether the
/// real module has a function by that position (CKR_FUNCTION_NOT_SUPPORTED before initialisation).
/// The 3.0 list is the 3.2 one's beginning, and the 2.40 list the 3.0 one's.
@Suite struct FunctionTableTests {
    @Test func functionOrderIsTheListOrder() {
        typealias List = CK_FUNCTION_LIST_3_2
        let first = MemoryLayout<List>.offset(of: \.C_Initialize)!
        let stride = MemoryLayout<UnsafeRawPointer?>.stride
        let offsets: [(Function, Int?)] = [
            (.C_Initialize, MemoryLayout<List>.offset(of: \.C_Initialize)),
            (.C_GetSlotList, MemoryLayout<List>.offset(of: \.C_GetSlotList)),
            (.C_SignInit, MemoryLayout<List>.offset(of: \.C_SignInit)),
            (.C_WaitForSlotEvent, MemoryLayout<List>.offset(of: \.C_WaitForSlotEvent)),
            (.C_GetInterfaceList, MemoryLayout<List>.offset(of: \.C_GetInterfaceList)),
            (.C_LoginUser, MemoryLayout<List>.offset(of: \.C_LoginUser)),
            (.C_MessageVerifyFinal, MemoryLayout<List>.offset(of: \.C_MessageVerifyFinal)),
            (.C_EncapsulateKey, MemoryLayout<List>.offset(of: \.C_EncapsulateKey)),
            (.C_VerifySignatureInit, MemoryLayout<List>.offset(of: \.C_VerifySignatureInit)),
            (.C_GetSessionValidationFlags, MemoryLayout<List>.offset(of: \.C_GetSessionValidationFlags)),
            (.C_AsyncJoin, MemoryLayout<List>.offset(of: \.C_AsyncJoin)),
            (.C_UnwrapKeyAuthenticated, MemoryLayout<List>.offset(of: \.C_UnwrapKeyAuthenticated)),
        ]
        for (function, offset) in offsets {
            #expect(offset == first + function.rawValue * stride, "\(function)")
        }
        #expect(MemoryLayout<List>.size == first + Function.allCases.count * stride)
        #expect(MemoryLayout<CK_FUNCTION_LIST_3_0>.size == first + Function.C_EncapsulateKey.rawValue * stride)
        #expect(MemoryLayout<CK_FUNCTION_LIST>.size == first + Function.C_GetInterfaceList.rawValue * stride)
        // 105 entries in all (the version and 104 functions), as the 3.2 specification lists them.
        #expect(Function.allCases.count == 104)
    }
}
