//! Reads the Dockerfile's instructions, for the tests that check the recipe statically and the
//! tests that compare the built images with it.

use std::collections::BTreeMap;

/// One Dockerfile instruction with continuation lines joined and comments dropped.
#[derive(Debug, Clone)]
pub struct Instruction {
    /// Upper-cased keyword (`FROM`, `RUN`, `COPY`, ...).
    pub keyword: String,
    /// Everything after the keyword, continuation lines joined with a space.
    pub args: String,
    /// Index of the build stage (0-based) the instruction belongs to.
    pub stage: usize,
}

/// The instructions of a Dockerfile's text, in order.
pub fn parse(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut stage: Option<usize> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body.trim());
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        out.push(Instruction {
            keyword,
            args: args.trim().to_string(),
            stage: stage.unwrap_or(0),
        });
    }
    out
}

/// Stage index of each `FROM ... AS name`.
pub fn stage_names(instructions: &[Instruction]) -> Vec<(usize, String)> {
    instructions
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            let name = words
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case("AS"))
                .map(|w| w[1].to_string())
                .unwrap_or_default();
            (i.stage, name)
        })
        .collect()
}

/// Stage index of the target `name`, if the Dockerfile has one.
pub fn stage_of(instructions: &[Instruction], name: &str) -> Option<usize> {
    stage_names(instructions)
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(s, _)| s)
}

/// The `key="value"` pairs of every `LABEL` in `stage` (values unquoted, `${ARG}` left as is).
pub fn labels(instructions: &[Instruction], stage: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for ins in instructions
        .iter()
        .filter(|i| i.stage == stage && i.keyword == "LABEL")
    {
        let mut rest = ins.args.as_str();
        while let Some((key, after)) = rest.split_once("=\"") {
            let Some((value, tail)) = after.split_once('"') else {
                break;
            };
            out.insert(key.trim().to_string(), value.to_string());
            rest = tail;
        }
    }
    out
}

/// The arguments of the last `keyword` instruction in `stage` (e.g. `USER`, `ENTRYPOINT`).
pub fn last<'a>(instructions: &'a [Instruction], stage: usize, keyword: &str) -> Option<&'a str> {
    instructions
        .iter()
        .rfind(|i| i.stage == stage && i.keyword == keyword)
        .map(|i| i.args.as_str())
}
