//! Signatures: Standard Webhooks v1 verification and signing, signing secrets with
//! rotation, and the replay guard. Pure functions: time is always passed in.

pub mod postback;
pub mod replay;
pub mod secret;
pub mod webhooks;

pub use replay::ReplayGuard;
pub use secret::{SecretSet, WebhookSecret};
pub use webhooks::{sign, verify, SignatureFailure, WebhookHeaders};
