import CPKCS11
import Testing
@testable import P11ForkCore

/// What a failed recovery step does next (docs/FORK.md "PINs", "Faults from the real module"):
/// which login answers are tried again, how far apart the tries are, and what a child without a
/// working module answers.
@Suite struct RecoveryRetryTests {
    /// A verdict on the PIN, or a code that might be one, is final: an HSM locks a PIN after a few
    /// wrong tries.
    @Test(arguments: [CK_RV(CKR_PIN_INCORRECT), CK_RV(CKR_PIN_INVALID), CK_RV(CKR_PIN_LEN_RANGE), CK_RV(CKR_PIN_EXPIRED), CK_RV(CKR_PIN_LOCKED),
                      CK_RV(CKR_USER_TYPE_INVALID), CK_RV(CKR_ARGUMENTS_BAD), 0x8000_0042 /* a vendor's code */] as [CK_RV])
    func finalLoginAnswers(_ rv: CK_RV) {
        #expect(!Logins.mayTryAgain(rv))
    }

    /// Answers that say the token could not judge the PIN at that moment are tried again.
    @Test(arguments: [CK_RV(CKR_USER_PIN_NOT_INITIALIZED), CK_RV(CKR_TOKEN_NOT_PRESENT), CK_RV(CKR_TOKEN_NOT_RECOGNIZED),
                      CK_RV(CKR_DEVICE_ERROR), CK_RV(CKR_DEVICE_MEMORY), CK_RV(CKR_DEVICE_REMOVED), CK_RV(CKR_GENERAL_ERROR), CK_RV(CKR_FUNCTION_FAILED),
                      CK_RV(CKR_HOST_MEMORY), CK_RV(CKR_SESSION_CLOSED), CK_RV(CKR_SESSION_HANDLE_INVALID)] as [CK_RV])
    func loginAnswersTriedAgain(_ rv: CK_RV) {
        #expect(Logins.mayTryAgain(rv))
    }

    /// 50 ms after the first failure, doubling, at most 3.2 s; the tries are numbered from 1.
    @Test func delaysDoubleUpToTheLongest() {
        var schedule = RetrySchedule()
        #expect(schedule.nextTry == "try 1")
        let delays = (0..<9).map { _ in schedule.failed() }
        #expect(delays == ["50 ms", "100 ms", "200 ms", "400 ms", "800 ms", "1600 ms", "3200 ms", "3200 ms", "3200 ms"])
        #expect(schedule.nextTry == "try 10")
        #expect(RetrySchedule().isDue)
    }

    /// A child whose module could not be made to work answers every call with what its
    /// C_Initialize said when any function may answer that (PKCS#11 2.40 section 5.1: universal
    /// and device codes), else CKR_DEVICE_ERROR: a C_Sign must not answer
    /// CKR_CRYPTOKI_ALREADY_INITIALIZED.
    @Test(arguments: [(CK_RV(CKR_GENERAL_ERROR), CK_RV(CKR_GENERAL_ERROR)), (CK_RV(CKR_HOST_MEMORY), CK_RV(CKR_HOST_MEMORY)),
                      (CK_RV(CKR_FUNCTION_FAILED), CK_RV(CKR_FUNCTION_FAILED)), (CK_RV(CKR_DEVICE_ERROR), CK_RV(CKR_DEVICE_ERROR)),
                      (CK_RV(CKR_DEVICE_MEMORY), CK_RV(CKR_DEVICE_MEMORY)), (CK_RV(CKR_DEVICE_REMOVED), CK_RV(CKR_DEVICE_REMOVED)),
                      (CK_RV(CKR_CRYPTOKI_ALREADY_INITIALIZED), CK_RV(CKR_DEVICE_ERROR)), (CK_RV(CKR_ARGUMENTS_BAD), CK_RV(CKR_DEVICE_ERROR)),
                      (CK_RV(CKR_OK), CK_RV(CKR_DEVICE_ERROR))] as [(CK_RV, CK_RV)])
    func callsOfAChildWithoutAModuleAnswer(_ initialize: CK_RV, _ every: CK_RV) {
        #expect(Recovery.answer(forFailedInitialization: initialize) == every)
    }

    /// A module that could not even be loaded (no C_Initialize answer) gives CKR_DEVICE_ERROR.
    @Test func aModuleThatCouldNotBeLoadedAnswersDeviceError() {
        #expect(Recovery.answer(forFailedInitialization: nil) == CK_RV(CKR_DEVICE_ERROR))
    }
}

