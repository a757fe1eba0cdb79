import CPKCS11
import Testing
@testable import P11ForkCore

/// `Function`'s order is the order of CK_FUNCTION_LIST_3_0's entries: `Call` finds whether the
/// real module has a function by that position (CKR_FUNCTION_NOT_SUPPORTED before initialisation).
@Suite struct FunctionTableTests {
    @Test func functionOrderIsTheListOrder() {
        let first = MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_Initialize)!
        let stride = MemoryLayout<UnsafeRawPointer?>.stride
        let offsets: [(Function, Int?)] = [
            (.C_Initialize, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_Initialize)),
            (.C_GetSlotList, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_GetSlotList)),
            (.C_SignInit, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_SignInit)),
            (.C_WaitForSlotEvent, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_WaitForSlotEvent)),
            (.C_GetInterfaceList, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_GetInterfaceList)),
            (.C_LoginUser, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_LoginUser)),
            (.C_MessageVerifyFinal, MemoryLayout<CK_FUNCTION_LIST_3_0>.offset(of: \.C_MessageVerifyFinal)),
        ]
        for (function, offset) in offsets {
            #expect(offset == first + function.rawValue * stride, "\(function)")
        }
        #expect(MemoryLayout<CK_FUNCTION_LIST_3_0>.size == first + Function.allCases.count * stride)
    }
}
