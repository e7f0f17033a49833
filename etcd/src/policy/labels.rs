//! Endpoint labels: keys of 1–63 characters of `[A-Za-z0-9_./-]`, values of up to 63 printable
//! characters. Checked where labels enter (the agent's API, weftctl, weft-cni).

use std::collections::BTreeMap;

/// Longest label key and value.
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels one endpoint may carry.
pub const MAX_LABELS: usize = 64;

/// Why a label is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key {0:?} is not 1-63 characters of [A-Za-z0-9_./-]")]
    Key(String),
    #[error("label {key:?} has a value that is not up to 63 printable characters: {value:?}")]
    Value { key: String, value: String },
    #[error("{0} labels given; at most 64 are allowed")]
    TooMany(usize),
    #[error("{0:?} is not a label: expected KEY=VALUE")]
    Syntax(String),
}

pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_LABEL_LEN
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
}

pub fn valid_value(value: &str) -> bool {
    value.chars().count() <= MAX_LABEL_LEN && !value.chars().any(char::is_control)
}

/// Checks a whole label map.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (key, value) in labels {
        if !valid_key(key) {
            return Err(LabelError::Key(key.clone()));
        }
        if !valid_value(value) {
            return Err(LabelError::Value {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// Parses `KEY=VALUE` (the value may be empty or hold `=`).
pub fn parse_label(text: &str) -> Result<(String, String), LabelError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| LabelError::Syntax(text.to_string()))?;
    let mut one = BTreeMap::new();
    one.insert(key.to_string(), value.to_string());
    validate_labels(&one)?;
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_the_contract() {
        assert!(valid_key("app") && valid_key("k8s.io/name-x_1"));
        for bad in ["", "a b", "a=b", "é", &"k".repeat(64)] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        assert!(valid_value("") && valid_value("web front") && valid_value(&"v".repeat(63)));
        assert!(!valid_value(&"v".repeat(64)) && !valid_value("a\nb"));
        assert_eq!(parse_label("app=web=1"), Ok(("app".into(), "web=1".into())));
        assert!(matches!(parse_label("app"), Err(LabelError::Syntax(_))));
        assert!(matches!(parse_label("a b=c"), Err(LabelError::Key(_))));
        let many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(validate_labels(&many), Err(LabelError::TooMany(65)));
    }
}
