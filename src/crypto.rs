//! The crypto core: AES-256-GCM sealing of secret values under per-version data keys.
//!
//! Pure computation: no IO besides drawing randomness from the operating system. Key material
//! and plaintext live in zeroizing newtypes without `Debug`, `Clone` or `Serialize`, read
//! through one explicit `expose_secret` method.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

/// Length of a data key and of a master key, in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce, in bytes (96 bits, drawn at random for every seal).
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// Errors of the crypto core.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A ciphertext did not open: wrong key, wrong associated data, or altered bytes. Which
    /// of these is deliberately not said.
    #[error("decryption failed")]
    Decrypt,
    /// Encryption failed (only possible for inputs far beyond byokd's size limits).
    #[error("encryption failed")]
    Encrypt,
    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Rng(getrandom::Error),
    /// A key or nonce had the wrong length.
    #[error("invalid {what} length {len}")]
    Length {
        /// What had the wrong length.
        what: &'static str,
        /// The length it had.
        len: usize,
    },
}

/// A secret value in memory: zeroized on drop, never printed.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes ownership of `bytes` without copying them.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes. Every read of a secret value goes through here.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the value has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A 256-bit AES key: a per-version data key, or key material derived from a master key.
pub struct SymmetricKey(Zeroizing<[u8; KEY_LEN]>);

impl SymmetricKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut()).map_err(CryptoError::Rng)?;
        Ok(Self(key))
    }

    /// A key from exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let array: [u8; KEY_LEN] = bytes.try_into().map_err(|_| CryptoError::Length {
            what: "key",
            len: bytes.len(),
        })?;
        Ok(Self(Zeroizing::new(array)))
    }

    /// A key from bytes already held in a zeroizing buffer.
    pub fn from_array(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self(bytes)
    }

    /// The key bytes, for wrapping under a master key.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// Output of [`seal`]: the random nonce and the ciphertext with its tag appended.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The nonce, drawn at random for this seal.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` under `key` with a fresh random nonce, authenticating `aad`.
pub fn seal(key: &SymmetricKey, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(CryptoError::Rng)?;
    seal_with_nonce(key, nonce, plaintext, aad)
}

/// Decrypts `sealed` under `key`, checking `aad`. Any mismatch is [`CryptoError::Decrypt`].
pub fn open(key: &SymmetricKey, sealed: &Sealed, aad: &[u8]) -> Result<Plaintext, CryptoError> {
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    cipher
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad,
            },
        )
        .map(Plaintext::new)
        .map_err(|_| CryptoError::Decrypt)
}

/// [`seal`] with a caller-chosen nonce. Only the known-answer tests choose nonces: reusing a
/// nonce under one key breaks AES-GCM.
fn seal_with_nonce(
    key: &SymmetricKey,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Sealed, CryptoError> {
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(Sealed { nonce, ciphertext })
}

/// Builds associated data from a domain label and fields, each length-prefixed so that no two
/// different field lists encode to the same bytes.
pub fn associated_data(label: &str, fields: &[&[u8]]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    for part in std::iter::once(label.as_bytes()).chain(fields.iter().copied()) {
        // Fields are names, ids and small integers: far below 4 GiB.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// Fills a fixed-size array from the operating system's random number generator.
pub fn random_array<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(CryptoError::Rng)?;
    Ok(out)
}

/// A bearer token (a principal's or a lease's) held in memory: no `Debug`, `Display`,
/// `Clone` or `Serialize`, zeroized on drop, read only through [`SecretToken::expose_secret`].
pub struct SecretToken(Zeroizing<String>);

impl SecretToken {
    /// Takes ownership of a token's text (as read from a flag or the environment).
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// The token text, for the one place that sends, prints or hashes it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

/// A bearer token: `prefix` followed by 256 random bits in unpadded base64url.
pub fn random_token(prefix: &str) -> Result<SecretToken, CryptoError> {
    use base64::Engine;
    let bytes = Zeroizing::new(random_array::<32>()?);
    let mut token = Zeroizing::new(String::with_capacity(prefix.len() + 43));
    token.push_str(prefix);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes.as_slice(), &mut token);
    Ok(SecretToken(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SymmetricKey {
        SymmetricKey::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    #[test]
    fn seal_open_round_trip() {
        let k = key(7);
        let sealed = seal(&k, b"sk-ant-secret", b"aad").unwrap();
        assert_eq!(sealed.ciphertext.len(), b"sk-ant-secret".len() + TAG_LEN);
        assert_eq!(
            open(&k, &sealed, b"aad").unwrap().expose_secret(),
            b"sk-ant-secret"
        );
    }

    #[test]
    fn nonces_differ_between_seals() {
        let k = key(7);
        let a = seal(&k, b"v", b"").unwrap();
        let b = seal(&k, b"v", b"").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn wrong_key_aad_or_bytes_fail_alike() {
        let k = key(7);
        let sealed = seal(&k, b"value", b"aad").unwrap();
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        let mut bad_nonce = sealed.clone();
        bad_nonce.nonce[0] ^= 1;
        for (k, s, aad) in [
            (&key(8), &sealed, &b"aad"[..]),
            (&k, &sealed, &b"aaD"[..]),
            (&k, &flipped, &b"aad"[..]),
            (&k, &bad_nonce, &b"aad"[..]),
        ] {
            let err = open(k, s, aad).err().unwrap();
            assert!(matches!(err, CryptoError::Decrypt));
            assert_eq!(err.to_string(), "decryption failed");
        }
    }

    #[test]
    fn associated_data_is_unambiguous() {
        assert_ne!(
            associated_data("l", &[b"ab", b"c"]),
            associated_data("l", &[b"a", b"bc"])
        );
        assert_ne!(associated_data("l", &[b"a"]), associated_data("m", &[b"a"]));
    }

    #[test]
    fn key_length_is_checked() {
        assert!(matches!(
            SymmetricKey::from_slice(&[0; 31]),
            Err(CryptoError::Length { len: 31, .. })
        ));
    }

    proptest::proptest! {
        /// Any value under any key opens again with the same associated data, and with no
        /// other.
        #[test]
        fn seal_open_round_trips_and_binds_aad(
            key in proptest::array::uniform32(proptest::num::u8::ANY),
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            aad in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
            other in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
            flip in proptest::num::usize::ANY,
        ) {
            let k = SymmetricKey::from_slice(&key).unwrap();
            let sealed = seal(&k, &value, &aad).unwrap();
            let opened = open(&k, &sealed, &aad).unwrap();
            proptest::prop_assert_eq!(opened.expose_secret(), &value[..]);
            if other != aad {
                proptest::prop_assert!(open(&k, &sealed, &other).is_err());
            }
            let mut tampered = sealed.clone();
            let i = flip % tampered.ciphertext.len();
            tampered.ciphertext[i] ^= 1;
            proptest::prop_assert!(open(&k, &tampered, &aad).is_err());
        }

        /// Distinct field lists never share associated data.
        #[test]
        fn associated_data_is_injective(
            a in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..8), 0..4),
            b in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..8), 0..4),
        ) {
            let fa: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
            let fb: Vec<&[u8]> = b.iter().map(Vec::as_slice).collect();
            proptest::prop_assert_eq!(a == b, associated_data("l", &fa) == associated_data("l", &fb));
        }
    }

    /// Project Wycheproof AES-GCM vectors (tests/data/wycheproof, origin in tests/data/README.md),
    /// restricted to byokd's parameters: 256-bit keys, 96-bit nonces, 128-bit tags.
    #[test]
    fn wycheproof_aes_256_gcm_known_answers() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/wycheproof/aes_gcm_test.json"
        ))
        .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for group in doc["testGroups"].as_array().unwrap() {
            if group["keySize"] != 256 || group["ivSize"] != 96 || group["tagSize"] != 128 {
                continue;
            }
            for case in group["tests"].as_array().unwrap() {
                let id = &case["tcId"];
                let k = SymmetricKey::from_slice(&hex(&case["key"])).unwrap();
                let nonce: [u8; NONCE_LEN] = hex(&case["iv"]).try_into().unwrap();
                let (aad, msg) = (hex(&case["aad"]), hex(&case["msg"]));
                let mut expected = hex(&case["ct"]);
                expected.extend(hex(&case["tag"]));
                let sealed = Sealed {
                    nonce,
                    ciphertext: expected.clone(),
                };
                match case["result"].as_str().unwrap() {
                    "valid" => {
                        let ours = seal_with_nonce(&k, nonce, &msg, &aad).unwrap();
                        assert_eq!(ours.ciphertext, expected, "tcId {id}");
                        let opened = open(&k, &sealed, &aad).unwrap();
                        assert_eq!(opened.expose_secret(), &msg[..], "tcId {id}");
                        valid += 1;
                    }
                    "invalid" => {
                        assert!(open(&k, &sealed, &aad).is_err(), "tcId {id} must not open");
                        invalid += 1;
                    }
                    other => panic!("tcId {id}: unexpected result {other}"),
                }
            }
        }
        // The 66 vectors of the 256-bit key, 96-bit nonce group, as counted in the file.
        assert_eq!((valid, invalid), (39, 27));
    }
}
