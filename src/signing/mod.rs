//! Signatures: Standard Webhooks v1 verification and signing, signing secrets with
//! rotation, and the replay guard. Pure functions: time is always passed in.

pub mod postback;
pub mod replay;
pub mod secret;
pub mod webhooks;

pub use replay::ReplayGuard;
pub use secret::{SecretSet, WebhookSecret};
pub use webhooks::{sign, sign_all, verify, SignatureFailure, WebhookHeaders};

/// `Ok` when any expected MAC equals any given one, comparing every pair in constant time
/// (no early exit that would reveal which key or entry matched).
fn any_match(expected: impl IntoIterator<Item = [u8; 32]>, given: &[[u8; 32]]) -> Result<(), SignatureFailure> {
    use subtle::ConstantTimeEq;
    let mut matched = subtle::Choice::from(0u8);
    for e in expected {
        for g in given {
            matched |= e.ct_eq(g);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SignatureFailure::Mismatch)
    }
}
