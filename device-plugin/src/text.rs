//! How untrusted text (IDs from the kubelet, values from the configuration, panic messages) is
//! echoed in messages: cut short, never whole. At the bottom of the crate: imports nothing of it.

/// `text` cut to at most `max` characters, with a note of the full length when cut: for
/// echoing untrusted input in messages without echoing all of it.
pub fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_cuts_long_text() {
        assert_eq!(shorten("abc", 5), "abc");
        let long = "x".repeat(1 << 20);
        let short = shorten(&long, 10);
        assert!(short.starts_with("xxxxxxxxxx…"));
        assert!(short.contains("1048576 bytes"));
        assert_eq!(shorten("äöüäöü", 3), "äöü… (12 bytes)");
    }
}
