//! The text exposition format as the tests read it: one parser for every test file.

/// The value of the first sample line starting with `prefix` (name plus labels), if any.
pub fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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
pub type ParsedSample = (String, Vec<(String, String)>, f64);

/// Parses one sample line into (name, [(label, unescaped value)], value).
pub fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let mut chars = line.char_indices().peekable();
    let mut name = String::new();
    while let Some(&(_, c)) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut labels = Vec::new();
    if let Some(&(_, '{')) = chars.peek() {
        chars.next();
        loop {
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    key.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if key.is_empty() {
                if let Some(&(_, '}')) = chars.peek() {
                    chars.next();
                    break;
                }
                return Err("bad label name".into());
            }
            if chars.next().map(|c| c.1) != Some('=') || chars.next().map(|c| c.1) != Some('"') {
                return Err(format!("label {key}: expected =\""));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|c| c.1) {
                    None => return Err(format!("label {key}: unterminated value")),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|c| c.1) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("label {key}: bad escape {other:?}")),
                    },
                    Some('\n') => return Err(format!("label {key}: raw newline")),
                    Some(c) => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next().map(|c| c.1) {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("after a label: {other:?}")),
            }
        }
    }
    if chars.next().map(|c| c.1) != Some(' ') {
        return Err("expected one space before the value".into());
    }
    let rest: String = chars.map(|c| c.1).collect();
    let value = match rest.as_str() {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} (no timestamps expected)"))?,
    };
    Ok((name, labels, value))
}
