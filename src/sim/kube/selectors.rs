//! Label and field selectors, parsed and matched as the apiserver does.

use super::ApiError;
use k8s_openapi::api::core::v1::Service;
use std::collections::BTreeMap;

#[derive(Default)]
pub(super) struct Filter {
    pub(super) namespace: Option<String>,
    pub(super) labels: Vec<LabelReq>,
    pub(super) fields: Vec<FieldReq>,
}

impl Filter {
    pub(super) fn parse(
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            namespace: namespace.map(str::to_owned),
            labels: labels
                .map(parse_label_selector)
                .transpose()
                .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?
                .unwrap_or_default(),
            fields: fields
                .map(parse_field_selector)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    pub(super) fn matches(&self, svc: &Service) -> bool {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self
                .labels
                .iter()
                .all(|r| r.matches(svc.metadata.labels.as_ref()))
            && self.fields.iter().all(|r| r.matches(svc))
    }
}

enum LabelOp {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

pub(super) struct LabelReq {
    key: String,
    op: LabelOp,
}

impl LabelReq {
    pub(super) fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let v = labels.and_then(|l| l.get(&self.key));
        let int = || v.and_then(|v| v.parse::<i64>().ok());
        match &self.op {
            LabelOp::Exists => v.is_some(),
            LabelOp::NotExists => v.is_none(),
            LabelOp::Eq(x) => v == Some(x),
            LabelOp::NotEq(x) => v != Some(x),
            LabelOp::In(set) => v.is_some_and(|v| set.contains(v)),
            LabelOp::NotIn(set) => v.is_none_or(|v| !set.contains(v)),
            LabelOp::Gt(n) => int().is_some_and(|x| x > *n),
            LabelOp::Lt(n) => int().is_some_and(|x| x < *n),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn label_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(v.to_owned())
    } else {
        Err(format!("invalid label value: \"{v}\""))
    }
}

fn label_set(v: &str) -> Result<Vec<String>, String> {
    let inner = v
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            format!(
                "expected a parenthesised set of values, found \"{}\"",
                v.trim()
            )
        })?;
    let values = inner
        .split(',')
        .map(label_value)
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().all(String::is_empty) {
        return Err("for 'in', 'notin' operators, values set can't be empty".to_owned());
    }
    Ok(values)
}

fn strip_word<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(word)?;
    rest.starts_with(|c: char| c.is_whitespace() || c == '(')
        .then_some(rest)
}

pub(super) fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(parse_label_requirement).collect()
}

fn parse_label_requirement(p: &str) -> Result<LabelReq, String> {
    let p = p.trim();
    let valid_key = |k: &str| -> Result<String, String> {
        if k.is_empty() || !k.chars().all(is_key_char) {
            Err(format!("invalid label key: \"{k}\""))
        } else {
            Ok(k.to_owned())
        }
    };
    if let Some(rest) = p.strip_prefix('!') {
        return Ok(LabelReq {
            key: valid_key(rest.trim())?,
            op: LabelOp::NotExists,
        });
    }
    let end = p.find(|c: char| !is_key_char(c)).unwrap_or(p.len());
    let key = valid_key(&p[..end])?;
    let rest = p[end..].trim_start();
    let int = |v: &str| {
        v.trim().parse::<i64>().map_err(|_| {
            format!(
                "for 'Gt', 'Lt' operators, the value must be an integer: \"{}\"",
                v.trim()
            )
        })
    };
    let op = if rest.is_empty() {
        LabelOp::Exists
    } else if let Some(v) = rest.strip_prefix("!=") {
        LabelOp::NotEq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix("==") {
        LabelOp::Eq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix('=') {
        LabelOp::Eq(label_value(v)?)
    } else if let Some(v) = rest.strip_prefix('>') {
        LabelOp::Gt(int(v)?)
    } else if let Some(v) = rest.strip_prefix('<') {
        LabelOp::Lt(int(v)?)
    } else if let Some(v) = strip_word(rest, "notin") {
        LabelOp::NotIn(label_set(v)?)
    } else if let Some(v) = strip_word(rest, "in") {
        LabelOp::In(label_set(v)?)
    } else {
        return Err(format!("unexpected operator in \"{p}\""));
    };
    Ok(LabelReq { key, op })
}

#[derive(Clone, Copy)]
enum Field {
    Name,
    Namespace,
    Type,
    ClusterIp,
}

pub(super) struct FieldReq {
    field: Field,
    value: String,
    negate: bool,
}

impl FieldReq {
    pub(super) fn matches(&self, svc: &Service) -> bool {
        let spec = svc.spec.as_ref();
        let actual = match self.field {
            Field::Name => svc.metadata.name.as_deref(),
            Field::Namespace => svc.metadata.namespace.as_deref(),
            // The apiserver defaults the type on create; objects here are stored as given.
            Field::Type => Some(spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")),
            Field::ClusterIp => spec.and_then(|s| s.cluster_ip.as_deref()),
        }
        .unwrap_or_default();
        (actual == self.value) != self.negate
    }
}

/// `field=value`, `field==value`, `field!=value`, comma-separated, with `\` escapes in values.
/// The fields are the ones the Services registry makes selectable.
pub(super) fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut terms = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let term = terms.last_mut();
                if let Some(t) = term {
                    t.push('\\');
                    if let Some(n) = chars.next() {
                        t.push(n);
                    }
                }
            }
            ',' => terms.push(String::new()),
            _ => {
                if let Some(t) = terms.last_mut() {
                    t.push(c);
                }
            }
        }
    }
    let mut reqs = Vec::new();
    for term in terms {
        if term.is_empty() && s.trim().is_empty() {
            continue;
        }
        let Some(eq) = term.find('=') else {
            return Err(ApiError::bad_request(format!(
                "invalid selector: '{s}'; can't understand '{term}'"
            )));
        };
        let (field, negate, value) = if term[..eq].ends_with('!') {
            (&term[..eq - 1], true, &term[eq + 1..])
        } else {
            let v = &term[eq + 1..];
            (&term[..eq], false, v.strip_prefix('=').unwrap_or(v))
        };
        let field = match field.trim() {
            "metadata.name" => Field::Name,
            "metadata.namespace" => Field::Namespace,
            "spec.type" => Field::Type,
            "spec.clusterIP" => Field::ClusterIp,
            other => {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {other}"
                )));
            }
        };
        let mut unescaped = String::new();
        let mut vc = value.chars();
        while let Some(c) = vc.next() {
            if c == '\\' {
                if let Some(n) = vc.next() {
                    unescaped.push(n);
                }
            } else {
                unescaped.push(c);
            }
        }
        reqs.push(FieldReq {
            field,
            value: unescaped,
            negate,
        });
    }
    Ok(reqs)
}
