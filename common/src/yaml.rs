//! Configuration files are YAML and may hold a secret (a PIN) next to the field that is
//! wrong, so a parse error has to say where the problem is without repeating the file.

use serde::de::DeserializeOwned;

/// Parses YAML into `T`; an empty (or blank) file is `T`'s defaults. Errors name the field
/// (`devices[0].product`), line and column, and never quote the text.
pub fn parse<T: DeserializeOwned + Default>(text: &str) -> Result<T, String> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    // The parser's snippet would show the lines around the error: possibly the PIN.
    let options = serde_saphyr::options! { with_snippet: false };
    let mut field = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| match field {
        Some(f) if f != "." => format!("{f}: {e}"),
        _ => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct File {
        hsm: Hsm,
        #[serde(default)]
        devices: Vec<Device>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Hsm {
        pin: String,
        slot_id: Option<u64>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Device {
        product: u16,
    }

    const SECRET: &str = "s3cret-PIN-1";

    #[test]
    fn valid_text_parses() {
        let file: File =
            parse("hsm:\n  pin: 1234\n  slotId: 0\ndevices:\n  - product: 7\n").expect("valid");
        assert_eq!(file.hsm.slot_id, Some(0));
        assert_eq!(file.hsm.pin, "1234");
        assert_eq!(file.devices, vec![Device { product: 7 }]);
    }

    #[test]
    fn a_blank_file_is_all_defaults() {
        for text in ["", "  \n\n"] {
            assert_eq!(parse::<File>(text).expect("blank"), File::default());
        }
    }

    #[test]
    fn the_field_path_is_named() {
        let err = parse::<File>(&format!("hsm:\n  pin: {SECRET}\n  slotId: nope\n"))
            .expect_err("not a number");
        assert!(err.starts_with("hsm.slotId: "), "{err}");
        let err = parse::<File>("hsm:\n  pin: x\ndevices:\n  - product: 1\n  - product: big\n")
            .expect_err("not a number");
        assert!(err.starts_with("devices[1].product: "), "{err}");
    }

    #[test]
    fn an_unknown_field_is_named() {
        let err = parse::<File>(&format!("hsm:\n  pin: {SECRET}\n  slotid: 1\n"))
            .expect_err("unknown field");
        assert!(err.contains("unknown field `slotid`"), "{err}");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let err = parse::<File>(&format!("hsm:\n  pin: {SECRET}\n   oops: [\n"))
            .expect_err("broken YAML");
        assert!(err.contains("line 3"), "{err}");
    }

    /// Whatever the error, the PIN on the neighbouring line stays out of the message.
    #[test]
    fn a_secret_on_a_neighbouring_line_is_never_quoted() {
        for text in [
            format!("hsm:\n  pin: {SECRET}\n  slotId: nope\n"),
            format!("hsm:\n  pin: {SECRET}\n  slotid: 1\n"),
            format!("hsm:\n  pin: {SECRET}\n   oops: [\n"),
            format!("hsm:\n  slotId: 1\n  pin: {SECRET}\n  pin: {SECRET}\n"),
        ] {
            let err = parse::<File>(&text).expect_err(&text);
            assert!(err.contains("line "), "{err}");
            assert!(!err.contains(SECRET), "{err}");
        }
    }
}
