//! The text exposition format as the tests read it: one parser for every test file.

/// The value of the first sample line starting with `prefix` (name plus labels), if any and well-formed.
pub fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| parse_sample(l).ok())
        .map(|(_, _, v)| v)
}

/// The samples of family `name` that carry every label pair of `with` (other labels may follow).
pub fn samples_where(body: &str, name: &str, with: &[(&str, &str)]) -> Vec<ParsedSample> {
    family_lines(body, name)
        .into_iter()
        .filter_map(|l| parse_sample(l).ok())
        .filter(|(_, labels, _)| {
            with.iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .collect()
}

/// Sample lines of a family (exact name match before `{` or space).
pub fn family_lines<'a>(body: &'a str, family: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

/// Checks a text exposition body line by line: every line is a `# HELP`/`# TYPE` comment or a sample
/// `name{label="value",...} value` with correctly escaped label values. Returns the first bad line.
pub fn check_exposition(body: &str) -> Result<usize, String> {
    let mut samples = 0;
    for (i, line) in body.lines().enumerate() {
        if line.is_empty() {
            return Err(format!("line {}: empty line", i + 1));
        }
        if let Some(rest) = line.strip_prefix('#') {
            let ok = rest.starts_with(" HELP ") || rest.starts_with(" TYPE ");
            if !ok {
                return Err(format!("line {}: unknown comment {line:?}", i + 1));
            }
            continue;
        }
        parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", i + 1))?;
        samples += 1;
    }
    Ok(samples)
}

/// A parsed sample line: name, labels (name, unescaped value) in order, value.
pub type ParsedSample = (String, Labels, f64);

/// Labels as (name, unescaped value), in order.
pub type Labels = Vec<(String, String)>;

/// Parses one sample line `name{label="value",...} value` (labels optional, no timestamp): a valid
/// metric name, valid label names each once, label values unescaped (`\\`, `\"` and `\n` only), one
/// space, and a value that is `+Inf`, `-Inf`, `NaN` or a plain decimal float.
pub fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        (labels, rest) = parse_labels(r)?;
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let v = parse_value(value)
        .ok_or_else(|| format!("bad value {value:?} (no timestamps expected)"))?;
    Ok((name.to_string(), labels, v))
}

/// The labels after `{`, up to its `}`; returns them and what follows.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        if !labels.is_empty() {
            rest = rest
                .strip_prefix(',')
                .ok_or("expected `,` or `}` after a label")?;
        }
        let eq = rest.find('=').ok_or("no `=` after a label name")?;
        let key = &rest[..eq];
        if !is_label_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {key}: expected =\""))?;
        let (value, r) = label_value(rest).map_err(|e| format!("label {key}: {e}"))?;
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} twice"));
        }
        labels.push((key.to_string(), value));
        rest = r;
    }
}

/// An escaped label value after its opening quote: the value unescaped and what follows its closing quote.
fn label_value(rest: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = rest.char_indices();
    loop {
        match chars.next() {
            None => return Err("unterminated value".into()),
            Some((i, '"')) => return Ok((value, &rest[i + 1..])),
            Some((_, '\\')) => match chars.next().map(|c| c.1) {
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('n') => value.push('\n'),
                other => return Err(format!("bad escape {other:?}")),
            },
            Some((_, '\n')) => return Err("raw newline".into()),
            Some((_, c)) => value.push(c),
        }
    }
}

pub fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

pub fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// The exposition value: `+Inf`, `-Inf`, `NaN`, or a plain decimal float.
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+')) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}
