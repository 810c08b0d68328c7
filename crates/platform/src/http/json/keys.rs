//! Reads each key of a JSON object as it was written, so that a repeated key is refused.
//!
//! serde_json hands a repeated key to the visitor twice: a derived struct refuses it, but a
//! `serde_json::Value`, a map and the fields a `#[serde(flatten)]` field collects keep the last
//! value without a word. A proxy or a log that reads the first value would then disagree with
//! the service about what was asked, so every object is held to unique keys, whatever reads it.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, Visitor};

use super::objects::{forward_deserialize, forward_visit};

/// The keys one JSON object has shown so far.
#[derive(Default)]
pub(super) struct Keys(HashSet<String>);

impl Keys {
    /// The next key of `map`, read with `seed`, or an error naming it if the object already
    /// had it.
    pub(super) fn next<'de, A, K>(
        &mut self,
        map: &mut A,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error>
    where
        A: MapAccess<'de>,
        K: DeserializeSeed<'de>,
    {
        let mut written = None;
        let key = map.next_key_seed(KeySeed {
            seed,
            written: &mut written,
        })?;
        match written {
            Some(written) if self.0.contains(&written) => {
                Err(de::Error::custom(format_args!("duplicate key `{written}`")))
            }
            Some(written) => {
                self.0.insert(written);
                Ok(key)
            }
            None => Ok(key),
        }
    }
}

/// A key's seed, its deserializer wrapped so that the key's text lands in `written`.
struct KeySeed<'k, S> {
    seed: S,
    written: &'k mut Option<String>,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Key {
            inner: deserializer,
            written: self.written,
        })
    }
}

/// A key's deserializer: whichever way the key is read (a string, a number parsed from it, an
/// enum variant), its visitor records what it was given.
struct Key<'k, D> {
    inner: D,
    written: &'k mut Option<String>,
}

impl<'k, D> Key<'k, D> {
    fn split<V>(self, visitor: V) -> (D, Record<'k, V>) {
        let record = Record {
            inner: visitor,
            written: self.written,
        };
        (self.inner, record)
    }

    fn split_struct<V>(self, visitor: V) -> (D, Record<'k, V>) {
        self.split(visitor)
    }

    fn wrapped(&self) -> &D {
        &self.inner
    }
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Key<'_, D> {
    type Error = D::Error;

    forward_deserialize!();
}

struct Record<'k, V> {
    inner: V,
    written: &'k mut Option<String>,
}

impl<V> Record<'_, V> {
    fn pass<T: KeyText + ?Sized>(self, value: &T) -> V {
        *self.written = value.key_text();
        self.inner
    }
}

/// A key as text, whether the visitor was handed the key or a number or flag parsed from it;
/// `()` (a visitor told of no value) is none.
trait KeyText {
    fn key_text(&self) -> Option<String>;
}

impl KeyText for () {
    fn key_text(&self) -> Option<String> {
        None
    }
}

macro_rules! displayed_key {
    ($($ty:ty)*) => {$(
        impl KeyText for $ty {
            fn key_text(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}

displayed_key!(bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char &str String);

impl KeyText for &[u8] {
    fn key_text(&self) -> Option<String> {
        Some(String::from_utf8_lossy(self).into_owned())
    }
}

impl KeyText for Vec<u8> {
    fn key_text(&self) -> Option<String> {
        Some(String::from_utf8_lossy(self).into_owned())
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Record<'_, V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(formatter)
    }

    forward_visit!();

    /// An optional or newtype key reads the same key again, still recorded.
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        let key = Key {
            inner: deserializer,
            written: self.written,
        };
        self.inner.visit_some(key)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        let key = Key {
            inner: deserializer,
            written: self.written,
        };
        self.inner.visit_newtype_struct(key)
    }

    /// A key read as an enum names its variant: the variant is the key.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(KeyVariant {
            inner: data,
            written: self.written,
        })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(map)
    }
}

struct KeyVariant<'k, A> {
    inner: A,
    written: &'k mut Option<String>,
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for KeyVariant<'_, A> {
    type Error = A::Error;
    type Variant = A::Variant;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, A::Variant), A::Error> {
        self.inner.variant_seed(KeySeed {
            seed,
            written: self.written,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Deserialize;
    use serde_json::Value;

    use super::super::from_slice;
    use crate::ApiError;

    /// The refusal's `param` and message, after checking it is the usual 400.
    fn refused(error: ApiError) -> (Option<String>, String) {
        assert_eq!(error.status(), actix_web::http::StatusCode::BAD_REQUEST);
        assert_eq!(error.body().code.as_deref(), Some("invalid_value"));
        (error.body().param.clone(), error.body().message.clone())
    }

    #[test]
    fn a_repeated_key_is_refused_wherever_a_value_or_map_reads_it() {
        // Regression: each of these kept its last value, so `"type":"json_object","type":"text"`
        // passed the json_object refusal and `vocab_size` took the second, huge value.
        #[derive(Debug, Deserialize)]
        #[expect(dead_code, reason = "only deserialised")]
        struct Job {
            hyper_parameters: Value,
            #[serde(default)]
            node_selector: BTreeMap<String, String>,
        }
        let job = |body: &str| refused(from_slice::<Job>(body.as_bytes()).expect_err(body));
        let (param, message) =
            job(r#"{"hyper_parameters": {"vocab_size": 300, "vocab_size": 200000000}}"#);
        assert_eq!(param.as_deref(), Some("hyper_parameters.vocab_size"));
        assert!(message.contains("duplicate key `vocab_size`"), "{message}");
        let (param, _) = job(r#"{"hyper_parameters": {}, "node_selector": {"a": "1", "a": "2"}}"#);
        assert_eq!(param.as_deref(), Some("node_selector.a"));
        // Deep inside a value, after other keys.
        let (param, _) = job(r#"{"hyper_parameters": {"x": [{"y": {"a": 1, "b": 2, "a": 3}}]}}"#);
        assert_eq!(param.as_deref(), Some("hyper_parameters.x[0].y.a"));
        // The body itself read as a value.
        let error = from_slice::<Value>(br#"{"model": "nope", "model": "real"}"#).expect_err("");
        assert_eq!(refused(error).0.as_deref(), Some("model"));
    }

    #[test]
    fn a_repeated_key_is_refused_through_flatten_and_untagged_enums() {
        // serde buffers these before deserializing, which on its own keeps the last value.
        #[derive(Debug, Deserialize)]
        #[expect(dead_code, reason = "only deserialised")]
        struct Labelled {
            name: String,
            #[serde(flatten)]
            labels: HashMap<String, String>,
        }
        let error = from_slice::<Labelled>(br#"{"name": "r", "tier": "a", "tier": "b"}"#);
        assert_eq!(refused(error.expect_err("")).0.as_deref(), Some("tier"));

        #[derive(Debug, Deserialize)]
        #[serde(untagged)]
        #[expect(dead_code, reason = "only deserialised")]
        enum Selector {
            Alias { alias: String },
        }
        let error = from_slice::<Selector>(br#"{"alias": "a", "alias": "b"}"#);
        assert_eq!(refused(error.expect_err("")).0.as_deref(), Some("alias"));
    }

    #[test]
    fn keys_read_as_numbers_or_variants_are_recorded_too() {
        // serde_json parses a number key itself and hands the visitor a number, not the text.
        let error = from_slice::<BTreeMap<u32, u32>>(br#"{"1": 1, "1": 2}"#).expect_err("");
        let (param, message) = refused(error);
        assert_eq!(param.as_deref(), Some("1"));
        assert!(message.contains("duplicate key `1`"), "{message}");

        #[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Role {
            User,
        }
        let error = from_slice::<BTreeMap<Role, u32>>(br#"{"user": 1, "user": 2}"#);
        assert_eq!(refused(error.expect_err("")).0.as_deref(), Some("user"));
    }

    #[test]
    fn objects_with_distinct_keys_read_as_before() {
        let value: Value = from_slice(br#"{"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]}"#)
            .expect("the same key in different objects is no repeat");
        assert_eq!(value["b"][1]["a"], 3);
        let map: BTreeMap<u32, u32> = from_slice(br#"{"1": 1, "2": 2}"#).expect("numbers");
        assert_eq!(map.len(), 2);
    }
}
