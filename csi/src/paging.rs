//! ListVolumes / ListSnapshots paging. A token is the ID of the first entry of the next
//! page, so a page survives entries being added or removed between calls (the spec allows
//! duplicates or misses then, never an error). A token that is not an ID of the listed kind
//! is refused with ABORTED, as the spec says.

use crate::error::CsiError;

/// One page of `items` (sorted by `key`) starting at `token`, at most `max_entries` long
/// (0: all), and the token of the next page (empty when none).
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    token: &str,
    max_entries: i32,
    token_is_valid: impl Fn(&str) -> bool,
) -> Result<(Vec<T>, String), CsiError> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "max_entries must not be negative, got {max_entries}"
        )));
    }
    if !token.is_empty() && !token_is_valid(token) {
        return Err(CsiError::Aborted(format!(
            "starting_token {token:?} is not valid: start over without one"
        )));
    }
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|item| token.is_empty() || key(item) >= token)
        .collect();
    let max = usize::try_from(max_entries).unwrap_or(0);
    if max == 0 || rest.len() <= max {
        return Ok((rest, String::new()));
    }
    let next = rest.split_off(max);
    let token = next.first().map(|i| key(i).to_string()).unwrap_or_default();
    Ok((rest, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<String> {
        ["a1", "a2", "a3", "a4", "a5"].map(String::from).to_vec()
    }

    fn valid(t: &str) -> bool {
        t.starts_with('a')
    }

    #[test]
    fn pages_chain_through_next_tokens() {
        let (p1, t1) = page(ids(), |s| s, "", 2, valid).expect("p1");
        assert_eq!(
            (p1, t1.as_str()),
            (vec!["a1".to_string(), "a2".into()], "a3")
        );
        let (p2, t2) = page(ids(), |s| s, &t1, 2, valid).expect("p2");
        assert_eq!(p2, vec!["a3".to_string(), "a4".into()]);
        let (p3, t3) = page(ids(), |s| s, &t2, 2, valid).expect("p3");
        assert_eq!((p3, t3), (vec!["a5".to_string()], String::new()));
        let (all, none) = page(ids(), |s| s, "", 0, valid).expect("all");
        assert_eq!((all.len(), none), (5, String::new()));
    }

    #[test]
    fn a_deleted_token_entry_resumes_at_the_next_one() {
        let mut items = ids();
        items.remove(2);
        let (p, _) = page(items, |s| s, "a3", 1, valid).expect("page");
        assert_eq!(p, vec!["a4".to_string()]);
    }

    #[test]
    fn bad_tokens_abort_and_negative_sizes_are_invalid() {
        assert!(matches!(
            page(ids(), |s| s, "zz", 1, valid),
            Err(CsiError::Aborted(_))
        ));
        assert!(matches!(
            page(ids(), |s| s, "", -1, valid),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
