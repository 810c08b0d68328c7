//! A deserializer that takes a struct only from a JSON object, never from an array, and an
//! object only with unique keys ([`super::keys`]).
//!
//! serde's derived `Deserialize` for a struct also accepts a sequence and fills the fields by
//! position, so `["r1", {"lr": 0.1}]` would pass for `{"name": "r1", "hyper_parameters": ...}`.
//! No client means that: it is a mistake that happens to parse, and a body read by position
//! silently changes meaning when a field is added or reordered. [`ObjectsOnly`] wraps the
//! JSON deserializer and hands every struct a visitor that refuses a sequence.
//!
//! The check must reach nested structs too (a field holding a struct, a list of them, a struct
//! variant of an enum), so every deserializer, sequence, map and enum the wrapped one hands on
//! is wrapped in turn. Everything else passes through unchanged: lists, tuples, maps, enums and
//! newtypes read as before, and errors keep the inner deserializer's type, so
//! `serde_path_to_error` around the wrapper still names the path of the value at fault.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};

use super::keys::Keys;

/// `D`, except that a struct is taken from an object only, and no object repeats a key.
// TODO: what serde buffers before deserializing (the fields a `#[serde(flatten)]` field takes,
// the content of untagged and internally tagged enums) is read from serde's own buffer, not
// through this wrapper, so a struct inside it still accepts an array. No request type has a
// struct there today (the model registry's flattened `Lineage` holds none).
pub(super) struct ObjectsOnly<D>(pub(super) D);

/// Every deserializer method, passed on to the wrapped deserializer with the visitor wrapped:
/// the wrapper's `split(visitor)` returns both, `split_struct` for a struct's visitor, and
/// `wrapped()` the deserializer it wraps. Both wrappers, here and in [`super::keys`], use it.
macro_rules! forward_deserialize {
    () => {
        forward_deserialize! {
            deserialize_any() deserialize_bool()
            deserialize_i8() deserialize_i16() deserialize_i32() deserialize_i64()
            deserialize_i128()
            deserialize_u8() deserialize_u16() deserialize_u32() deserialize_u64()
            deserialize_u128()
            deserialize_f32() deserialize_f64() deserialize_char()
            deserialize_str() deserialize_string() deserialize_bytes() deserialize_byte_buf()
            deserialize_option() deserialize_unit() deserialize_seq() deserialize_map()
            deserialize_identifier() deserialize_ignored_any()
            deserialize_unit_struct(name: &'static str)
            deserialize_newtype_struct(name: &'static str)
            deserialize_tuple(len: usize)
            deserialize_tuple_struct(name: &'static str, len: usize)
            deserialize_enum(name: &'static str, variants: &'static [&'static str])
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            let (inner, visitor) = self.split_struct(visitor);
            inner.deserialize_struct(name, fields, visitor)
        }

        fn is_human_readable(&self) -> bool {
            self.wrapped().is_human_readable()
        }
    };
    ($($method:ident($($arg:ident: $ty:ty),*))*) => {$(
        fn $method<V>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Self::Error>
        where
            V: Visitor<'de>,
        {
            let (inner, visitor) = self.split(visitor);
            inner.$method($($arg,)* visitor)
        }
    )*};
}

pub(super) use forward_deserialize;

impl<D> ObjectsOnly<D> {
    fn split<V>(self, visitor: V) -> (D, Visit<V>) {
        (self.0, Visit::any(visitor))
    }

    /// The one difference: a struct's visitor refuses a sequence.
    fn split_struct<V>(self, visitor: V) -> (D, Visit<V>) {
        (self.0, Visit::object(visitor))
    }

    fn wrapped(&self) -> &D {
        &self.0
    }
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    forward_deserialize!();
}

/// A visitor passed on with whatever it is handed wrapped, so that the check reaches the
/// values inside. When it stands for a struct (`object`), it refuses a sequence and tells the
/// client it expected a JSON object rather than naming a Rust type.
struct Visit<V> {
    inner: V,
    object: bool,
}

impl<V> Visit<V> {
    fn any(inner: V) -> Self {
        Self {
            inner,
            object: false,
        }
    }

    fn object(inner: V) -> Self {
        Self {
            inner,
            object: true,
        }
    }
}

/// Visitor methods whose value holds nothing to wrap (and those with no value), passed on to the wrapped visitor that
/// the wrapper's `pass(&value)` returns (after noting the value, if it wants). Both visitor
/// wrappers, here and in [`super::keys`], use it.
macro_rules! forward_visit {
    () => {
        forward_visit! {
            visit_bool(bool)
            visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64) visit_i128(i128)
            visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64) visit_u128(u128)
            visit_f32(f32) visit_f64(f64) visit_char(char)
            visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
            visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
        }

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.pass(&()).visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.pass(&()).visit_unit()
        }
    };
    ($($method:ident($value:ty))*) => {$(
        fn $method<E: de::Error>(self, value: $value) -> Result<V::Value, E> {
            let inner = self.pass(&value);
            inner.$method(value)
        }
    )*};
}

pub(super) use forward_visit;

impl<V> Visit<V> {
    fn pass<T: ?Sized>(self, _value: &T) -> V {
        self.inner
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Visit<V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object {
            formatter.write_str("a JSON object")
        } else {
            self.inner.expecting(formatter)
        }
    }

    forward_visit!();

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(ObjectsOnly(deserializer))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(ObjectsOnly(deserializer))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.object {
            return Err(de::Error::invalid_type(Unexpected::Seq, &self));
        }
        self.inner.visit_seq(Seq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Map {
            access: map,
            keys: Keys::default(),
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(Enum(data))
    }
}

/// A seed that deserializes its value through [`ObjectsOnly`].
struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(ObjectsOnly(deserializer))
    }
}

struct Seq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// An object: its values are wrapped, its keys checked for repeats.
struct Map<A> {
    access: A,
    keys: Keys,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.keys.next(&mut self.access, seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.access.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.access.size_hint()
    }
}

struct Enum<A>(A);

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Variant<A::Variant>), A::Error> {
        let (tag, variant) = self.0.variant_seed(Seed(seed))?;
        Ok((tag, Variant(variant)))
    }
}

struct Variant<A>(A);

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Visit::any(visitor))
    }

    /// A struct variant is a struct: `{"Variant": [..]}` is refused as a struct field would be.
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Visit::object(visitor))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::super::from_slice;
    use crate::ApiError;

    #[derive(Debug, PartialEq, Deserialize)]
    struct Run {
        name: String,
        #[serde(default)]
        hyper_parameters: Option<HyperParameters>,
        #[serde(default)]
        datasets: Vec<Dataset>,
        #[serde(default)]
        schedule: Option<Schedule>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct HyperParameters {
        lr: f64,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Dataset {
        reference: String,
        #[serde(default)]
        weight: Option<f64>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Schedule {
        Constant,
        Warmup(u32),
        Steps(u32, f64),
        Cosine { cycles: u32 },
    }

    fn refusal(body: &str) -> ApiError {
        from_slice::<Run>(body.as_bytes()).expect_err("refused")
    }

    /// The refusal's `param` and message, after checking it is the usual 400.
    fn refused(body: &str) -> (Option<String>, String) {
        let error = refusal(body);
        assert_eq!(error.status(), actix_web::http::StatusCode::BAD_REQUEST);
        assert_eq!(error.body().code.as_deref(), Some("invalid_value"));
        (error.body().param.clone(), error.body().message.clone())
    }

    #[test]
    fn a_body_that_is_an_array_is_refused_for_a_struct() {
        // Regression: `["r1"]` was read as `{"name": "r1"}`, the other fields defaulting.
        let (param, message) = refused(r#"["r1"]"#);
        assert_eq!(param, None, "the body itself is at fault");
        assert!(
            message.contains("invalid type: sequence, expected a JSON object"),
            "{message}"
        );
    }

    #[test]
    fn an_array_where_a_nested_struct_belongs_is_refused_by_its_path() {
        let (param, message) = refused(r#"{"name": "r1", "hyper_parameters": [0.1]}"#);
        assert_eq!(param.as_deref(), Some("hyper_parameters"));
        assert!(
            message
                .starts_with("`hyper_parameters`: invalid type: sequence, expected a JSON object"),
            "{message}"
        );
        // The second dataset (index 1) is the array.
        let (param, _) = refused(r#"{"name": "r1", "datasets": [{"reference": "a"}, ["b"]]}"#);
        assert_eq!(param.as_deref(), Some("datasets[1]"));
        // A struct variant is a struct too.
        let (param, _) = refused(r#"{"name": "r1", "schedule": {"cosine": [2]}}"#);
        assert_eq!(param.as_deref(), Some("schedule.cosine"));
    }

    #[test]
    fn other_wrong_types_for_a_struct_say_a_json_object_was_expected() {
        let (param, message) = refused(r#"{"name": "r1", "hyper_parameters": 5}"#);
        assert_eq!(param.as_deref(), Some("hyper_parameters"));
        assert!(
            message.contains("invalid type: integer `5`, expected a JSON object"),
            "not serde's `struct HyperParameters`: {message}"
        );
    }

    #[test]
    fn lists_enums_and_newtypes_read_as_before() {
        let body = r#"{"name": "r1", "hyper_parameters": {"lr": 0.5},
            "datasets": [{"reference": "a"}, {"reference": "b", "weight": 2}],
            "schedule": {"cosine": {"cycles": 3}}}"#;
        let run: Run = from_slice(body.as_bytes()).expect("valid");
        assert_eq!(
            run,
            Run {
                name: "r1".into(),
                hyper_parameters: Some(HyperParameters { lr: 0.5 }),
                datasets: vec![
                    Dataset {
                        reference: "a".into(),
                        weight: None
                    },
                    Dataset {
                        reference: "b".into(),
                        weight: Some(2.0)
                    },
                ],
                schedule: Some(Schedule::Cosine { cycles: 3 }),
            }
        );
        // Unit, newtype and tuple variants: a tuple variant's array is its legitimate form.
        for (schedule, expected) in [
            (r#""constant""#, Schedule::Constant),
            (r#"{"warmup": 100}"#, Schedule::Warmup(100)),
            (r#"{"steps": [10, 0.5]}"#, Schedule::Steps(10, 0.5)),
        ] {
            let body = format!(r#"{{"name": "r1", "schedule": {schedule}}}"#);
            let run: Run = from_slice(body.as_bytes()).expect(schedule);
            assert_eq!(run.schedule, Some(expected));
        }

        #[derive(Debug, PartialEq, Deserialize)]
        struct Name(String);
        assert_eq!(from_slice::<Name>(br#""r1""#).ok(), Some(Name("r1".into())));
        let pairs: Vec<(String, u32)> = from_slice(br#"[["a", 1], ["b", 2]]"#).expect("tuples");
        assert_eq!(pairs, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
    }

    #[test]
    fn flattened_and_internally_tagged_types_still_read() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Labelled {
            name: String,
            #[serde(flatten)]
            labels: BTreeMap<String, String>,
        }
        let labelled: Labelled =
            from_slice(br#"{"name": "r1", "tier": "gold"}"#).expect("flattened");
        assert_eq!(labelled.labels["tier"], "gold");

        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Stage {
            Sft { epochs: u32 },
        }
        let stage: Stage = from_slice(br#"{"kind": "sft", "epochs": 2}"#).expect("tagged");
        assert_eq!(stage, Stage::Sft { epochs: 2 });
    }
}
