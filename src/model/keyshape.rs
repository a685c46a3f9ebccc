//! The shapes of the API keys of the model providers byokd knows, for two checks: a value
//! stored for a known provider that does not look like that provider's key is answered with
//! a warning (or refused, if the request asks for strict checks), and an identifier or free
//! text (tenant, name, label, reason, audience) that looks like any known key is refused, so
//! that a key pasted into the wrong field never reaches the audit trail or a backup in clear.
//!
//! The table is documented in SECURITY.md ("Key shapes"); keep the two in step.

use super::ValidationError;

/// The answer to a field that holds what looks like an API key.
pub const LOOKS_LIKE_A_KEY: &str = "looks like an API key; send it as the value";

/// Which characters a key's body is made of.
#[derive(Clone, Copy)]
enum Charset {
    /// `[A-Za-z0-9]`
    Alphanumeric,
    /// `[A-Za-z0-9_-]`
    UrlSafe,
    /// `[0-9a-f]`
    LowerHex,
}

impl Charset {
    fn allows(self, c: char) -> bool {
        match self {
            Charset::Alphanumeric => c.is_ascii_alphanumeric(),
            Charset::UrlSafe => c.is_ascii_alphanumeric() || c == '_' || c == '-',
            Charset::LowerHex => c.is_ascii_digit() || ('a'..='f').contains(&c),
        }
    }
}

/// One provider's keys: one of `prefixes` (none for unprefixed keys), then a body of
/// `len` characters of `charset`.
pub struct KeyShape {
    /// The provider's name, as given in `provider` (compared case-insensitively).
    pub provider: &'static str,
    /// Other names the provider is given.
    aliases: &'static [&'static str],
    /// What a key starts with; empty: no prefix.
    prefixes: &'static [&'static str],
    charset: Charset,
    /// Length of the body after the prefix, inclusive.
    len: (usize, usize),
    /// How the shape reads, for the warning.
    pub described: &'static str,
}

/// The providers byokd knows and the shapes of their API keys.
pub const SHAPES: &[KeyShape] = &[
    KeyShape {
        provider: "anthropic",
        aliases: &["claude"],
        prefixes: &["sk-ant-"],
        charset: Charset::UrlSafe,
        len: (40, 200),
        described: "sk-ant- then 40-200 of [A-Za-z0-9_-]",
    },
    KeyShape {
        provider: "openai",
        aliases: &[],
        prefixes: &["sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"],
        charset: Charset::UrlSafe,
        len: (40, 250),
        described: "sk- (or sk-proj-, sk-svcacct-, sk-admin-) then 40-250 of [A-Za-z0-9_-]",
    },
    KeyShape {
        provider: "google",
        aliases: &["gemini", "google-ai", "vertex"],
        prefixes: &["AIza"],
        charset: Charset::UrlSafe,
        len: (35, 35),
        described: "AIza then 35 of [A-Za-z0-9_-]",
    },
    KeyShape {
        provider: "mistral",
        aliases: &["mistralai"],
        prefixes: &[],
        charset: Charset::Alphanumeric,
        len: (32, 32),
        described: "32 of [A-Za-z0-9]",
    },
    KeyShape {
        provider: "groq",
        aliases: &[],
        prefixes: &["gsk_"],
        charset: Charset::Alphanumeric,
        len: (52, 52),
        described: "gsk_ then 52 of [A-Za-z0-9]",
    },
    KeyShape {
        provider: "openrouter",
        aliases: &[],
        prefixes: &["sk-or-v1-"],
        charset: Charset::LowerHex,
        len: (64, 64),
        described: "sk-or-v1- then 64 of [0-9a-f]",
    },
    KeyShape {
        provider: "xai",
        aliases: &["x.ai", "grok"],
        prefixes: &["xai-"],
        charset: Charset::Alphanumeric,
        len: (70, 100),
        described: "xai- then 70-100 of [A-Za-z0-9]",
    },
    KeyShape {
        provider: "huggingface",
        aliases: &["hf", "hugging-face"],
        prefixes: &["hf_"],
        charset: Charset::Alphanumeric,
        len: (30, 40),
        described: "hf_ then 30-40 of [A-Za-z0-9]",
    },
    KeyShape {
        provider: "cohere",
        aliases: &[],
        prefixes: &[],
        charset: Charset::Alphanumeric,
        len: (40, 40),
        described: "40 of [A-Za-z0-9]",
    },
    KeyShape {
        provider: "deepseek",
        aliases: &[],
        prefixes: &["sk-"],
        charset: Charset::LowerHex,
        len: (32, 32),
        described: "sk- then 32 of [0-9a-f]",
    },
];

impl KeyShape {
    /// The shape of `provider`'s keys, if byokd knows the provider.
    pub fn of(provider: &str) -> Option<&'static KeyShape> {
        SHAPES.iter().find(|s| {
            s.provider.eq_ignore_ascii_case(provider)
                || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(provider))
        })
    }

    /// Whether `text`, all of it, is shaped like one of this provider's keys.
    pub fn fits(&self, text: &str) -> bool {
        self.body(text).is_some()
    }

    /// The part of `text` after the longest of the prefixes it starts with, if it fits.
    fn body<'a>(&self, text: &'a str) -> Option<&'a str> {
        let bodies: Vec<&str> = if self.prefixes.is_empty() {
            vec![text]
        } else {
            self.prefixes
                .iter()
                .filter_map(|p| text.strip_prefix(p))
                .collect()
        };
        bodies.into_iter().find(|body| {
            let n = body.chars().count();
            n >= self.len.0 && n <= self.len.1 && body.chars().all(|c| self.charset.allows(c))
        })
    }

    /// Whether `token` (a run of key characters from some text) is this provider's key by
    /// more than its shape alone: it fits and its body mixes character classes as a random
    /// key does (letters and digits; for a key without a prefix, both cases and digits),
    /// which names and words written by people rarely do.
    fn found_in(&self, token: &str) -> bool {
        let Some(body) = self.body(token) else {
            return false;
        };
        let digit = body.chars().any(|c| c.is_ascii_digit());
        let lower = body.chars().any(|c| c.is_ascii_lowercase());
        let upper = body.chars().any(|c| c.is_ascii_uppercase());
        if self.prefixes.is_empty() {
            digit && lower && upper
        } else {
            digit && (lower || upper)
        }
    }
}

/// What is wrong with a value stored for `provider` that is not shaped like its keys (`None`
/// when it fits, or byokd does not know the provider). It never quotes the value.
pub fn value_warning(provider: &str, value: &[u8]) -> Option<String> {
    let shape = KeyShape::of(provider)?;
    let fits = std::str::from_utf8(value).is_ok_and(|text| shape.fits(text));
    (!fits).then(|| {
        format!(
            "does not look like {}'s API keys (expected {})",
            shape.provider, shape.described
        )
    })
}

/// Whether `text` holds, as one run of key characters (`[A-Za-z0-9_-]`), anything shaped like
/// a known provider's API key.
pub fn holds_a_key(text: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .filter(|token| token.len() >= 32)
        .any(|token| SHAPES.iter().any(|shape| shape.found_in(token)))
}

/// Refuses request field `field` if `text` holds what looks like an API key.
pub fn refuse_key(field: &'static str, text: &str) -> Result<(), ValidationError> {
    if holds_a_key(text) {
        return Err(ValidationError::new(field, LOOKS_LIKE_A_KEY));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample key of each provider (made up; shaped like the real ones).
    pub(crate) fn samples() -> Vec<(&'static str, String)> {
        let alnum = |n: usize| -> String {
            "aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0zA"
                .chars()
                .cycle()
                .take(n)
                .collect()
        };
        let hex = |n: usize| -> String { "0f1e2d3c4b5a6978".chars().cycle().take(n).collect() };
        vec![
            (
                "anthropic",
                format!("sk-ant-api03-{}-{}AA", alnum(80), alnum(12)),
            ),
            ("openai", format!("sk-proj-{}", alnum(156))),
            ("openai", format!("sk-{}", alnum(48))),
            ("google", format!("AIza{}", alnum(35))),
            ("mistral", alnum(32)),
            ("groq", format!("gsk_{}", alnum(52))),
            ("openrouter", format!("sk-or-v1-{}", hex(64))),
            ("xai", format!("xai-{}", alnum(80))),
            ("huggingface", format!("hf_{}", alnum(34))),
            ("cohere", alnum(40)),
            ("deepseek", format!("sk-{}", hex(32))),
        ]
    }

    #[test]
    fn every_sample_fits_its_provider_and_is_found_in_text() {
        for (provider, key) in samples() {
            assert_eq!(value_warning(provider, key.as_bytes()), None, "{provider}");
            assert!(holds_a_key(&key), "{provider}");
            assert!(holds_a_key(&format!("pasted: {key}, oops")), "{provider}");
            assert!(refuse_key("name", &key).is_err(), "{provider}");
        }
        assert_eq!(
            SHAPES.len(),
            10,
            "every provider the issue names has a shape"
        );
    }

    #[test]
    fn values_of_the_wrong_shape_are_warned_about_without_quoting_them() {
        let key = samples()[0].1.clone();
        let warning = value_warning("openrouter", key.as_bytes()).unwrap();
        assert!(warning.contains("openrouter"), "{warning}");
        assert!(!warning.contains(&key[..12]), "{warning}");
        // Whitespace around a pasted key is a wrong shape too.
        assert!(value_warning("anthropic", format!("{key}\n").as_bytes()).is_some());
        assert!(value_warning("Anthropic", key.as_bytes()).is_none());
        assert!(value_warning("claude", key.as_bytes()).is_none());
        assert!(value_warning("anthropic", &[0xff, 0xfe]).is_some());
        // Providers byokd does not know are never warned about.
        assert_eq!(value_warning("acme-llm", b"x"), None);
    }

    #[test]
    fn names_people_write_are_not_keys() {
        for text in [
            "sk-production-key-for-team-alpha",
            "sk-team-2024-production-keys-x",
            "openai-prod",
            "anthropic.key-2",
            "550e8400-e29b-41d4-a716-446655440000",
            "tenant_0123456789abcdef0123456789abcdef",
            "deadbeefdeadbeefdeadbeefdeadbeef",
            "the key was rotated because it leaked on 2026-11-30",
            "AIza",
            "hf_short",
        ] {
            assert!(!holds_a_key(text), "{text}");
        }
    }
}
