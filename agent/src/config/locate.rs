//! Where in the file a parse error is: the parser's message cleaned of its
//! own location, the line a broken construct began on, and the field path of
//! a line found from the indentation of the lines above it.

/// The parser's message without the location it appends (the location goes in the file part).
pub(super) fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    // serde_yaml_ng prefixes its own path ("services[0]: ...", "telemetry: ...");
    // the field part of the error already says where.
    match msg.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && !head.contains(char::is_whitespace) => {
            rest.to_string()
        }
        _ => msg,
    }
}

/// The line where the parser began what it could not finish — a key whose
/// colon never came, a quote never closed (`..., while scanning a simple key
/// at line 5 column 5`): that line is the broken one, not the line where the
/// parser gave up.
pub(super) fn context_line(full: &str) -> Option<usize> {
    let start = [
        "while scanning a simple key",
        "while scanning a quoted scalar",
        "while parsing a flow sequence",
        "while parsing a flow mapping",
    ]
    .iter()
    .find_map(|c| full.find(c))?;
    let ctx = &full[start..];
    let at = ctx.find(" at line ")? + " at line ".len();
    ctx[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether the parser's message is about the text's syntax rather than a value.
pub(super) fn is_syntax_error(message: &str) -> bool {
    [
        "did not find expected",
        "could not find expected",
        "found a tab character",
        "found unexpected",
        "mapping values are not allowed",
        "found character that cannot start any token",
        "while scanning",
        "while parsing",
    ]
    .iter()
    .any(|s| message.contains(s))
}

/// The field path of the key on `line` (1-based) of a block-style YAML text,
/// from the keys and list items that enclose it by indentation; the key on the
/// nearest line above with one when `line` has none. Tabs count as four spaces.
pub(super) fn path_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| {
        l.chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum::<usize>()
    };
    // A line's key: the name before its colon, after an optional `- `.
    let key = |l: &str| -> Option<String> {
        let t = l
            .trim_start_matches([' ', '\t'])
            .trim_start_matches("- ")
            .trim_start();
        let k: String = t
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!k.is_empty() && !t.starts_with('#')).then_some(k)
    };
    let mut at = line.checked_sub(1)?.min(lines.len().checked_sub(1)?);
    while key(lines[at]).is_none() {
        at = at.checked_sub(1)?;
    }
    let item = |l: &str| l.trim_start_matches([' ', '\t']).starts_with("- ");
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    // The index of the list item on line `i` among the items before it.
    let index_of = |i: usize| {
        let ind = indent(lines[i]);
        let mut index = 0;
        let mut j = i;
        while j > 0 {
            j -= 1;
            let p = lines[j];
            if blank(p) || indent(p) > ind {
                continue;
            }
            if indent(p) == ind && item(p) {
                index += 1;
            } else {
                break;
            }
        }
        index
    };
    let mut parts = vec![key(lines[at])?];
    if item(lines[at]) {
        parts.push(format!("[{}]", index_of(at)));
    }
    let mut level = indent(lines[at]);
    let mut i = at;
    while i > 0 && level > 0 {
        i -= 1;
        let l = lines[i];
        if blank(l) || indent(l) >= level {
            continue;
        }
        level = indent(l);
        if item(l) {
            // Our key lives in this item (its first key shares the dash's line).
            parts.push(format!("[{}]", index_of(i)));
        } else if let Some(k) = key(l) {
            parts.push(k);
        }
    }
    let mut path = String::new();
    for p in parts.iter().rev() {
        if !p.starts_with('[') && !path.is_empty() {
            path.push('.');
        }
        path.push_str(p);
    }
    Some(path)
}
