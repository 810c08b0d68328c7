//! The naming rule every service applies to model and alias names.
//!
//! A name is chosen in one service (a training job's `output_model_name`) and registered by
//! another (the model registry, from the job's `JobFinished`). If each kept its own rule, a
//! name one accepts and the other refuses would fail only after the work was done, in a
//! consumer nobody watches; one function here keeps the two in step.

/// Longest model or alias name, in bytes.
pub const MAX_NAME_BYTES: usize = 100;

/// Checks the rule of model and alias names: `[a-z0-9][a-z0-9._-]*`, 1 to 100 bytes. `:` and
/// `@` are left out because they separate the parts of a version reference. `what` names the
/// value in the message ("model name", "alias").
pub fn check_name(what: &str, text: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("{what} `{text}` {why}"));
    if text.is_empty() || text.len() > MAX_NAME_BYTES {
        return refuse("must be 1 to 100 characters long");
    }
    if !text.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return refuse("must start with a lowercase letter or a digit");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    if !text.chars().all(allowed) {
        return refuse("may contain only lowercase letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// Checks a model name: the shared rule, and not readable as a version id, which would make
/// the reference `<name>` ambiguous.
pub fn check_model_name(text: &str) -> Result<(), String> {
    check_name("model name", text)?;
    if uuid::Uuid::parse_str(text).is_ok() {
        return Err(format!(
            "model name `{text}` reads as a version id; pick another"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_names_with_separators_pass() {
        assert_eq!(check_model_name("smollm2-135m_instruct.v2"), Ok(()));
        assert_eq!(check_model_name(&"a".repeat(MAX_NAME_BYTES)), Ok(()));
    }

    #[test]
    fn names_outside_the_rule_are_refused() {
        // Each breaks exactly one clause of `[a-z0-9][a-z0-9._-]*`, 1..=100 bytes.
        for name in ["", "MyModel", "-lead", "a:b", "a@b", "a b"] {
            assert!(check_model_name(name).is_err(), "{name:?} passed");
        }
        assert!(check_model_name(&"a".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(check_model_name("0190c2a4-0000-7000-8000-000000000001").is_err());
    }
}
