//! Checks a spec's [`Resources`] as the Kubernetes API server would, before any Job exists.
//!
//! A spec the API server would refuse should be a 400 naming the field when the job is
//! submitted, not a failed attempt later. The rules are the API server's for quantities, label
//! keys and values, and tolerations; what they leave out (quotas, whether a node matches) only a
//! real cluster can tell.

use crate::backend::{Resources, Toleration};

/// One field the API server would refuse, named from the spec's root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidResources {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidResources {
    InvalidResources {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The first problem in `resources`, if any.
pub fn validate_resources(resources: &Resources) -> Result<(), InvalidResources> {
    for (field, value) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
        if let Some(value) = value
            && !is_quantity(value)
        {
            return Err(invalid(
                format!("resources.{field}"),
                format!("`{value}` is not a Kubernetes quantity such as `500m`, `4` or `16Gi`"),
            ));
        }
    }
    for (key, value) in &resources.node_selector {
        let field = format!("resources.node_selector.{key}");
        check_label_key(key).map_err(|problem| invalid(&field, problem))?;
        check_label_value(value).map_err(|problem| invalid(&field, problem))?;
    }
    for (index, toleration) in resources.tolerations.iter().enumerate() {
        check_toleration(toleration).map_err(|(field, problem)| {
            invalid(format!("resources.tolerations[{index}].{field}"), problem)
        })?;
    }
    if let Some(image) = &resources.image
        && (image.is_empty() || image.chars().any(char::is_whitespace))
    {
        return Err(invalid(
            "resources.image",
            "must be an image reference without spaces",
        ));
    }
    if resources.deadline_seconds == Some(0) {
        return Err(invalid(
            "resources.deadline_seconds",
            "must be greater than 0",
        ));
    }
    Ok(())
}

/// `<number><suffix>`: a decimal number (no sign: resources are never negative) followed by a
/// binary suffix (`Ki`..`Ei`), a decimal one (`n`, `u`, `m`, ``, `k`, `M`..`E`) or an
/// exponent (`e3`, `E-2`).
pub fn is_quantity(text: &str) -> bool {
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let dots = number.matches('.').count();
    if digits == 0 || dots > 1 {
        return false;
    }
    const SUFFIXES: [&str; 16] = [
        "", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    if SUFFIXES.contains(&suffix) {
        return true;
    }
    let Some(exponent) = suffix.strip_prefix(['e', 'E']) else {
        return false;
    };
    let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    !exponent.is_empty() && exponent.chars().all(|c| c.is_ascii_digit())
}

/// `[prefix/]name`: the prefix a DNS subdomain of at most 253 characters, the name at most 63.
fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let subdomain = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !subdomain {
            return Err(format!(
                "the key's prefix `{prefix}` is not a DNS subdomain"
            ));
        }
    }
    if name.is_empty() {
        return Err("the key's name is empty".into());
    }
    check_label_value(name).map_err(|problem| format!("the key's name: {problem}"))
}

/// At most 63 characters of `[A-Za-z0-9_.-]`, starting and ending alphanumeric; may be empty.
fn check_label_value(value: &str) -> Result<(), String> {
    let alphanumeric_ends = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    let allowed = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if value.is_empty() || (value.len() <= 63 && alphanumeric_ends && allowed) {
        Ok(())
    } else {
        Err(format!(
            "`{value}` must be at most 63 letters, digits, `-`, `_` or `.`, starting and ending \
             with a letter or digit"
        ))
    }
}

fn check_toleration(toleration: &Toleration) -> Result<(), (&'static str, String)> {
    let operator = toleration.operator.as_deref().unwrap_or("Equal");
    if !matches!(operator, "Equal" | "Exists") {
        return Err((
            "operator",
            format!("`{operator}` is not `Equal` or `Exists`"),
        ));
    }
    match toleration.key.as_deref() {
        Some(key) if !key.is_empty() => check_label_key(key).map_err(|p| ("key", p))?,
        // No key matches every taint, which only `Exists` can say.
        _ if operator != "Exists" => {
            return Err(("operator", "must be `Exists` when the key is empty".into()));
        }
        _ => {}
    }
    if operator == "Exists" && toleration.value.as_deref().is_some_and(|v| !v.is_empty()) {
        return Err((
            "value",
            "must be empty when the operator is `Exists`".into(),
        ));
    }
    if let Some(value) = &toleration.value {
        check_label_value(value).map_err(|p| ("value", p))?;
    }
    let effect = toleration.effect.as_deref();
    if let Some(effect) = effect
        && !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute")
    {
        return Err((
            "effect",
            format!("`{effect}` is not `NoSchedule`, `PreferNoSchedule` or `NoExecute`"),
        ));
    }
    if toleration.toleration_seconds.is_some() && effect != Some("NoExecute") {
        return Err((
            "toleration_seconds",
            "is only allowed with the effect `NoExecute`".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toleration(key: &str, operator: &str, value: Option<&str>, effect: &str) -> Toleration {
        Toleration {
            key: Some(key.to_owned()),
            operator: Some(operator.to_owned()),
            value: value.map(str::to_owned),
            effect: Some(effect.to_owned()),
            toleration_seconds: None,
        }
    }

    #[test]
    fn quantities_in_the_forms_kubernetes_documents_are_accepted() {
        // The memory examples of the Kubernetes resource-management page, plus CPU forms.
        for text in [
            "128974848",
            "129e6",
            "129M",
            "128974848000m",
            "123Mi",
            "500m",
            "0.5",
            "4",
            "1E3",
            "2Ki",
        ] {
            assert!(is_quantity(text), "{text}");
        }
    }

    #[test]
    fn quantities_with_a_sign_unit_typo_or_no_digits_are_refused() {
        for text in [
            "", "lots", "-1", "1.2.3", "16GB", "1Gb", "Mi", ".", "4 Gi", "1e", "2mi",
        ] {
            assert!(!is_quantity(text), "{text}");
        }
    }

    #[test]
    fn a_bad_memory_quantity_names_its_field() {
        let resources = Resources {
            memory: Some("16GB".into()),
            ..Resources::default()
        };
        let error = validate_resources(&resources).expect_err("16GB is not a quantity");
        assert_eq!(error.field, "resources.memory");
    }

    #[test]
    fn node_selector_keys_and_values_follow_label_syntax() {
        let mut resources = Resources::default();
        resources.node_selector.insert(
            "nvidia.com/gpu.product".into(),
            "NVIDIA-H100-80GB-HBM3".into(),
        );
        assert_eq!(validate_resources(&resources), Ok(()));

        resources
            .node_selector
            .insert("Bad_Prefix/x".into(), "ok".into());
        let error = validate_resources(&resources).expect_err("uppercase prefix");
        assert_eq!(error.field, "resources.node_selector.Bad_Prefix/x");

        resources.node_selector.remove("Bad_Prefix/x");
        resources
            .node_selector
            .insert("zone".into(), "-edge".into());
        assert!(
            validate_resources(&resources).is_err(),
            "value starting with -"
        );
    }

    #[test]
    fn tolerations_follow_the_api_servers_rules() {
        let ok = [
            toleration("nvidia.com/gpu", "Exists", None, "NoSchedule"),
            toleration("spot", "Equal", Some("true"), "NoExecute"),
            toleration("", "Exists", None, ""),
        ];
        let resources = Resources {
            tolerations: ok.to_vec(),
            ..Resources::default()
        };
        assert_eq!(validate_resources(&resources), Ok(()));

        let mut seconds_without_no_execute =
            toleration("spot", "Equal", Some("true"), "NoSchedule");
        seconds_without_no_execute.toleration_seconds = Some(60);
        let refused = [
            (toleration("gpu", "In", None, "NoSchedule"), "operator"),
            (
                toleration("gpu", "Exists", Some("yes"), "NoSchedule"),
                "value",
            ),
            (toleration("", "Equal", Some("x"), "NoSchedule"), "operator"),
            (toleration("gpu", "Exists", None, "Never"), "effect"),
            (seconds_without_no_execute, "toleration_seconds"),
        ];
        for (toleration, field) in refused {
            let resources = Resources {
                tolerations: vec![toleration.clone()],
                ..Resources::default()
            };
            let error = validate_resources(&resources).expect_err("refused");
            assert_eq!(
                error.field,
                format!("resources.tolerations[0].{field}"),
                "{toleration:?}"
            );
        }
    }

    #[test]
    fn a_zero_deadline_is_refused() {
        let resources = Resources {
            deadline_seconds: Some(0),
            ..Resources::default()
        };
        assert_eq!(
            validate_resources(&resources).map_err(|e| e.field),
            Err("resources.deadline_seconds".into())
        );
    }
}
