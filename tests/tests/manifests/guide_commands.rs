//! The stick commands the deploy guide gives, checked against the tools installed here: every
//! option of `sc-hsm-tool`, `pkcs15-tool`, `pkcs11-tool` and `opensc-tool` is one the tool's
//! usage lists, every `unseal-init` subcommand and option is one its command line has, and no
//! PIN or password is written out (only `env:VAR` or a `<placeholder>`).

use std::collections::BTreeMap;
use std::process::Command;

use clap::CommandFactory;

use nitrokey_e2e::host::repo;

/// OpenSC's tools whose usage text lists their options.
const OPENSC_TOOLS: [&str; 4] = ["sc-hsm-tool", "pkcs15-tool", "pkcs11-tool", "opensc-tool"];

/// Options whose value is a secret.
const SECRET_OPTIONS: [&str; 3] = ["--pin", "--so-pin", "--password"];

/// The shell code blocks of a markdown text (also those indented inside list items), each as
/// logical lines: continuation lines joined, lines inside an open quote joined, comments cut.
fn shell_blocks(markdown: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None if trimmed == "```sh" => current = Some(Vec::new()),
                None => {}
            }
            pending.clear();
            continue;
        }
        let Some(block) = current.as_mut() else {
            continue;
        };
        let code = strip_comment(trimmed);
        if !pending.is_empty() {
            pending.push(' ');
        }
        pending.push_str(code.trim_end_matches('\\').trim());
        let open_quote = pending.matches('\'').count() % 2 == 1;
        if code.ends_with('\\') || open_quote {
            continue;
        }
        block.push(std::mem::take(&mut pending));
    }
    blocks
}

/// `line` without a shell comment (a `#` at the start or after a blank, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}

/// One command of a pipeline or list: its words, with `$VAR` replaced by what the block
/// assigned to `VAR` (`VAR='…'`), quotes removed; for `kubectl exec … -- CMD`, CMD's words.
fn commands(line: &str, vars: &mut BTreeMap<String, String>) -> Vec<Vec<String>> {
    if let Some((name, value)) = line.split_once("='")
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    {
        vars.insert(name.to_owned(), value.trim_end_matches('\'').to_owned());
        return Vec::new();
    }
    let mut out = Vec::new();
    for part in line.split(['|', ';', '(', ')', '&']) {
        let mut words = Vec::new();
        for word in part.split_whitespace() {
            match word.strip_prefix('$').and_then(|v| vars.get(v)) {
                Some(value) => words.extend(value.split_whitespace().map(str::to_owned)),
                None => words.push(word.trim_matches(['"', '\'']).to_owned()),
            }
        }
        // `kubectl exec POD -- CMD …` runs CMD: that is the command to check.
        if words.first().is_some_and(|w| w == "kubectl")
            && let Some(at) = words.iter().position(|w| w == "--")
        {
            words.drain(..=at);
        }
        if !words.is_empty() {
            out.push(words);
        }
    }
    out
}

/// The tool's usage text (OpenSC's tools print it, on stdout or stderr, for an unknown
/// option such as `--help`).
fn opensc_usage(tool: &str) -> String {
    let out = Command::new(tool)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/install-deps.sh installs opensc)"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `usage` lists `option` (followed by a blank, `=` or the end of the line).
fn lists(usage: &str, option: &str) -> bool {
    usage.match_indices(option).any(|(i, _)| {
        usage[i + option.len()..]
            .chars()
            .next()
            .is_none_or(|c| c.is_whitespace() || c == '=' || c == ',')
    })
}

/// What is wrong with one `unseal-init` command line: an unknown subcommand or option. An
/// option's value (`--config FILE`) is skipped, so a subcommand after global options is still
/// checked as one.
fn unseal_init_problems(words: &[String]) -> Vec<String> {
    let mut command = unseal_init::cli::Cli::command();
    // Global options reach the subcommands only once the command is built.
    command.build();
    let mut problems = Vec::new();
    let mut in_subcommand = true;
    let mut rest = words[1..].iter();
    while let Some(word) = rest.next() {
        if let Some(option) = word.strip_prefix("--") {
            let (option, inline_value) = match option.split_once('=') {
                Some((name, _)) => (name, true),
                None => (option, false),
            };
            match command
                .get_arguments()
                .find(|a| a.get_long() == Some(option))
            {
                None => problems.push(format!(
                    "`--{option}` is not an option of `{}`",
                    command.get_name()
                )),
                Some(arg) => {
                    let needs_value = arg.get_num_args().is_some_and(|n| n.min_values() > 0);
                    if needs_value && !inline_value {
                        rest.next();
                    }
                }
            }
        } else if in_subcommand && !word.starts_with('-') {
            match command.find_subcommand(word) {
                Some(sub) => {
                    let mut sub = sub.clone();
                    sub.build();
                    command = sub;
                }
                None if command.has_subcommands() => {
                    problems.push(format!(
                        "`{word}` is not a subcommand of `{}`",
                        command.get_name()
                    ));
                    in_subcommand = false;
                }
                None => in_subcommand = false,
            }
        }
    }
    problems
}

/// The problems with the stick and `unseal-init` commands of the guide at `path` (relative
/// to the repository), and how many commands of each tool were checked.
fn guide_problems(path: &str) -> (Vec<String>, BTreeMap<String, usize>) {
    let guide = std::fs::read_to_string(repo().join(path)).expect(path);
    let usages: BTreeMap<&str, String> = OPENSC_TOOLS
        .iter()
        .map(|tool| (*tool, opensc_usage(tool)))
        .collect();
    let mut problems = Vec::new();
    let mut checked = BTreeMap::<String, usize>::new();
    for block in shell_blocks(&guide) {
        let mut vars = BTreeMap::new();
        for line in block {
            for words in commands(&line, &mut vars) {
                let tool = words[0].as_str();
                let found = if tool == "unseal-init" {
                    problems.extend(
                        unseal_init_problems(&words)
                            .into_iter()
                            .map(|p| format!("{line}: {p}")),
                    );
                    true
                } else if let Some(usage) = usages.get(tool) {
                    for option in words.iter().filter(|w| w.starts_with("--")) {
                        let option = option.split('=').next().unwrap_or_default();
                        if !lists(usage, option) {
                            problems.push(format!("{line}: {tool} has no {option}"));
                        }
                    }
                    true
                } else {
                    false
                };
                if !found {
                    continue;
                }
                *checked.entry(tool.to_owned()).or_default() += 1;
                for pair in words.windows(2) {
                    let value = pair[1].as_str();
                    if SECRET_OPTIONS.contains(&pair[0].as_str())
                        && !value.starts_with("env:")
                        && !(value.starts_with('<') || value.ends_with('>'))
                    {
                        problems.push(format!(
                            "{line}: {} {value}: a PIN or password as env:VAR, not written out",
                            pair[0]
                        ));
                    }
                }
            }
        }
    }
    (problems, checked)
}

#[test]
fn the_deploy_guide_gives_only_options_the_tools_have_and_no_pin() {
    let (problems, checked) = guide_problems("deploy/README.md");
    assert!(problems.is_empty(), "{problems:#?}");
    for tool in ["sc-hsm-tool", "pkcs15-tool", "pkcs11-tool", "unseal-init"] {
        assert!(
            checked.get(tool).is_some_and(|n| *n > 0),
            "no {tool} command found in deploy/README.md: {checked:?}"
        );
    }
}

#[test]
fn the_day_two_guides_give_only_options_the_tools_have_and_no_pin() {
    for guide in [
        "docs/recovery.md",
        "docs/rotation.md",
        "README.md",
        "unseal-init/README.md",
    ] {
        let (problems, checked) = guide_problems(guide);
        assert!(problems.is_empty(), "{guide}: {problems:#?}");
        assert!(
            checked.get("unseal-init").is_some_and(|n| *n > 0) || !guide.starts_with("docs/"),
            "no unseal-init command found in {guide}: {checked:?}"
        );
    }
}

#[test]
fn the_command_check_catches_what_it_is_for() {
    let block = "```sh\n\
        OPTS='--hsm-pin-file pin\n   --no-such-option'\n\
        sc-hsm-tool --wrap-key k.bin --pin env:PIN \\\n  --key-reference 1  # a comment --nope\n\
        unseal-init hsm reveal vault-root $OPTS | unseal-init hsm nonsense\n\
        kubectl -n vault exec vault-0 -- unseal-init --config c.yaml rekey --secret-shares 3\n\
        kubectl -n vault exec vault-0 -- unseal-init --config c.yaml hsm nonsense\n\
        ```\n";
    let blocks = shell_blocks(block);
    assert_eq!(blocks.len(), 1);
    let mut vars = BTreeMap::new();
    let lines = &blocks[0];
    assert!(commands(&lines[0], &mut vars).is_empty());
    assert_eq!(
        commands(&lines[1], &mut vars),
        vec![vec![
            "sc-hsm-tool",
            "--wrap-key",
            "k.bin",
            "--pin",
            "env:PIN",
            "--key-reference",
            "1"
        ]]
    );
    let piped = commands(&lines[2], &mut vars);
    assert_eq!(piped.len(), 2);
    let problems = unseal_init_problems(&piped[0]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("--no-such-option"), "{problems:?}");
    assert!(unseal_init_problems(&piped[1])[0].contains("nonsense"));
    let exec = commands(&lines[3], &mut vars);
    assert_eq!(exec[0][0], "unseal-init", "{exec:?}");
    assert!(unseal_init_problems(&exec[0]).is_empty(), "{exec:?}");
    let wrong = commands(&lines[4], &mut vars);
    let problems = unseal_init_problems(&wrong[0]);
    assert!(
        problems.len() == 1 && problems[0].contains("`nonsense` is not a subcommand of `hsm`"),
        "{problems:?}"
    );
    let usage = "  -W, --wrap-key <arg>   Wrap key\n      --pin <arg>\n";
    assert!(lists(usage, "--wrap-key") && lists(usage, "--pin"));
    assert!(!lists(usage, "--wrap") && !lists(usage, "--force"));
}
