//! Tokens at rest: a portal's access and refresh tokens are sealed with AES-256-GCM
//! under `B24_TOKEN_KEY` before they reach PostgreSQL, so a database dump or a
//! read-only role (the ingress's) gives no one a portal. The member_id is the
//! associated data: a sealed token copied to another portal's row does not open.
//!
//! Stored form: `v1.<key id>.<base64url(nonce ‖ ciphertext)>`, where the key id is the
//! first 8 hex digits of the key's SHA-256. Rotation: set the new key as
//! `B24_TOKEN_KEY` and the old one in `B24_TOKEN_KEYS_OLD`; at start-up the worker
//! re-seals every row under the new key, after which the old key can go.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use b24_shared::event::MemberId;
use b24_shared::portals::Sealed;
use b24_shared::Secret;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "v1";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("B24_TOKEN_KEY must be 32 bytes, base64 (`openssl rand -base64 32`) or 64 hex digits")]
    BadKey,
    #[error("stored token was sealed with key {0}, which is neither B24_TOKEN_KEY nor in B24_TOKEN_KEYS_OLD")]
    UnknownKey(String),
    #[error(
        "stored token does not open with its key (corrupted, or moved from another portal's row)"
    )]
    Corrupt,
}

struct Key {
    id: String,
    cipher: Aes256Gcm,
}

impl Key {
    fn parse(raw: &str) -> Result<Self, CryptoError> {
        let raw = raw.trim();
        let bytes = if raw.len() == 64 && raw.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(raw).map_err(|_| CryptoError::BadKey)?
        } else {
            STANDARD.decode(raw).map_err(|_| CryptoError::BadKey)?
        };
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        let id = hex::encode(&Sha256::digest(&bytes)[..4]);
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::BadKey)?;
        Ok(Self { id, cipher })
    }
}

/// The current key (sealing and opening) and old ones (opening only).
pub struct TokenCipher {
    current: Key,
    old: Vec<Key>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenCipher(key {}, {} old)",
            self.current.id,
            self.old.len()
        )
    }
}

/// What opening a stored value found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Sealed under the current key.
    Current(Secret),
    /// Readable but stored in clear text or under an old key: re-seal it.
    Stale(Secret),
}

impl Opened {
    pub fn secret(self) -> Secret {
        match self {
            Self::Current(s) | Self::Stale(s) => s,
        }
    }
}

impl TokenCipher {
    /// `current` is `B24_TOKEN_KEY`; `old` the comma-separated `B24_TOKEN_KEYS_OLD`.
    pub fn new(current: &Secret, old: Option<&Secret>) -> Result<Self, CryptoError> {
        let current = Key::parse(current.expose())?;
        let old = old
            .map(|o| {
                o.expose()
                    .split(',')
                    .filter(|k| !k.trim().is_empty())
                    .map(Key::parse)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Self { current, old })
    }

    pub fn seal(&self, member_id: &MemberId, token: &Secret) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: token.expose().as_bytes(),
            aad: member_id.as_str().as_bytes(),
        };
        // Encrypting a short message into memory with a valid key cannot fail.
        let ciphertext = self
            .current
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        Sealed(format!(
            "{PREFIX}.{}.{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(blob)
        ))
    }

    /// Opens a stored token. A value without our prefix is a clear-text row from
    /// before sealing existed: it is returned as stale, to be re-sealed.
    pub fn open(&self, member_id: &MemberId, stored: &Sealed) -> Result<Opened, CryptoError> {
        let Some(rest) = stored.0.strip_prefix("v1.") else {
            return Ok(Opened::Stale(Secret::new(stored.0.clone())));
        };
        let (id, body) = rest.split_once('.').ok_or(CryptoError::Corrupt)?;
        let (key, current) = if id == self.current.id {
            (&self.current, true)
        } else {
            let key = self
                .old
                .iter()
                .find(|k| k.id == id)
                .ok_or_else(|| CryptoError::UnknownKey(id.chars().take(8).collect()))?;
            (key, false)
        };
        let blob = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CryptoError::Corrupt)?;
        if blob.len() <= NONCE_LEN {
            return Err(CryptoError::Corrupt);
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let plain = key
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: member_id.as_str().as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Corrupt)?;
        let secret = Secret::new(String::from_utf8(plain).map_err(|_| CryptoError::Corrupt)?);
        Ok(if current {
            Opened::Current(secret)
        } else {
            Opened::Stale(secret)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn member(s: &str) -> MemberId {
        MemberId::parse(s).unwrap()
    }

    #[test]
    fn sealed_tokens_open_only_for_their_portal_and_never_show_the_token() {
        let c = TokenCipher::new(&Secret::new(K1), None).unwrap();
        let m = member("a223c6b3710f85df22e9377d6c4f7553");
        let token = Secret::new("s6p6eclrvim6da22ft9ch94ekreb52lv");
        let sealed = c.seal(&m, &token);
        assert!(sealed.0.starts_with("v1."), "{}", sealed.0);
        assert!(!sealed.0.contains("s6p6eclrvim6da22ft9ch94ekreb52lv"));
        assert_ne!(c.seal(&m, &token), sealed, "a fresh nonce each time");
        assert_eq!(c.open(&m, &sealed), Ok(Opened::Current(token)));
        assert_eq!(
            c.open(&member("da45a03b265edd8787f8a258d793cc5d"), &sealed),
            Err(CryptoError::Corrupt)
        );
        let mut tampered = sealed.0.clone();
        tampered.pop();
        tampered.push(if sealed.0.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(c.open(&m, &Sealed(tampered)), Err(CryptoError::Corrupt));
    }

    #[test]
    fn rotation_opens_old_seals_as_stale_and_clear_text_too() {
        let m = member("m1");
        let old = TokenCipher::new(&Secret::new(K1), None).unwrap();
        let sealed_old = old.seal(&m, &Secret::new("t"));
        let new = TokenCipher::new(&Secret::new(K2), Some(&Secret::new(K1))).unwrap();
        assert_eq!(
            new.open(&m, &sealed_old),
            Ok(Opened::Stale(Secret::new("t")))
        );
        assert_eq!(
            new.open(&m, &Sealed("cleartext".into())),
            Ok(Opened::Stale(Secret::new("cleartext")))
        );
        let without_old = TokenCipher::new(&Secret::new(K2), None).unwrap();
        assert!(matches!(
            without_old.open(&m, &sealed_old),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn keys_must_be_32_bytes() {
        for bad in ["", "short", "MDEyMzQ1Njc4OWFiY2RlZg==", &"0".repeat(63)] {
            assert_eq!(
                TokenCipher::new(&Secret::new(bad), None).unwrap_err(),
                CryptoError::BadKey,
                "{bad}"
            );
        }
    }
}
