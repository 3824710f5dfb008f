//! A failed `C_Decrypt` through the shim leaves the decrypt operation active, as OpenSC 0.23
//! does with a SmartCard-HSM and the TPM2 module does too, although SoftHSM2 underneath ends
//! it. Driven through cryptoki, the PKCS#11 binding the program uses. Alone in its test binary
//! because the shim reads its settings from this process's environment.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use nitrokey_e2e::softhsm::{KEY_LABEL, SoftHsm, USER_PIN};
use nitrokey_e2e::token::Token;

fn is_rv(result: &Result<Vec<u8>, Error>, rv: RvError) -> bool {
    matches!(result, Err(Error::Pkcs11(got, _)) if *got == rv)
}

#[test]
fn a_failed_decrypt_blocks_the_session_until_decrypt_final_or_a_new_session() {
    let hsm = SoftHsm::new().expect("softhsm");
    let shim = nitrokey_e2e::bins::pkcs11_shim().expect("shim module");
    // SAFETY: the only test in this binary, and nothing else reads the environment meanwhile.
    unsafe {
        for (k, v) in hsm.env() {
            std::env::set_var(k, v);
        }
        std::env::set_var("NKSHIM_MODULE", hsm.module());
    }
    let ctx = Pkcs11::new(&shim).expect("load shim");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| s.id() == hsm.slot_id())
        .expect("token slot");
    let session = ctx.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    let find = |class| {
        session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(KEY_LABEL.as_bytes().to_vec()),
            ])
            .expect("find key")[0]
    };
    let (public, private) = (
        find(ObjectClass::PUBLIC_KEY),
        find(ObjectClass::PRIVATE_KEY),
    );
    let good = session
        .encrypt(&Mechanism::RsaPkcs, public, b"share")
        .expect("encrypt");
    let junk = vec![0x01u8; good.len()];

    assert_eq!(
        session
            .decrypt(&Mechanism::RsaPkcs, private, &good)
            .expect("decrypt"),
        b"share"
    );
    assert!(
        session
            .decrypt(&Mechanism::RsaPkcs, private, &junk)
            .is_err()
    );
    let blocked = session.decrypt(&Mechanism::RsaPkcs, private, &good);
    assert!(is_rv(&blocked, RvError::OperationActive), "{blocked:?}");
    assert!(
        is_rv(
            &session.decrypt(&Mechanism::RsaPkcs, private, &good),
            RvError::OperationActive
        ),
        "still blocked: nothing ended the operation"
    );

    // Another session is not affected, and ending the operation unblocks this one.
    let other = ctx.open_rw_session(slot).expect("second session");
    assert_eq!(
        other
            .decrypt(&Mechanism::RsaPkcs, private, &good)
            .expect("decrypt"),
        b"share"
    );
    session.decrypt_final().expect("C_DecryptFinal");
    assert_eq!(
        session
            .decrypt(&Mechanism::RsaPkcs, private, &good)
            .expect("decrypt"),
        b"share"
    );
}
