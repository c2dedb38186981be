//! The small template language of `env` values and `annotations`: `{ids}`, `{paths}`,
//! `{count}` and `{resource}` are replaced per container request; `{{` and `}}` are literal
//! braces. Templates are parsed when the config is loaded, so a typo is a config error, not
//! a surprise at Allocate time.

/// What a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Ids,
    Paths,
    Count,
    Resource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Value(Placeholder),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{name}` with a name that is not a placeholder.
    #[error("unknown placeholder {{{name}}} (known: {{ids}}, {{paths}}, {{count}}, {{resource}}; write {{{{ for a literal brace)")]
    UnknownPlaceholder {
        /// The name between the braces.
        name: String,
    },
    /// A `{` without its `}`, or a lone `}`.
    #[error("unbalanced brace at byte {at} (write {{{{ or }}}} for a literal brace)")]
    Unbalanced {
        /// Byte offset of the brace.
        at: usize,
    },
}

/// The values a template is rendered with: one container request's devices.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Device IDs of the request, in request order.
    pub ids: &'a [String],
    /// Host paths of the request's device nodes.
    pub paths: &'a [String],
    /// The extended resource name.
    pub resource: &'a str,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let end = rest.find('}').ok_or(TemplateError::Unbalanced { at })?;
                    let name = &rest[..end];
                    let placeholder = match name {
                        "ids" => Placeholder::Ids,
                        "paths" => Placeholder::Paths,
                        "count" => Placeholder::Count,
                        "resource" => Placeholder::Resource,
                        _ => {
                            return Err(TemplateError::UnknownPlaceholder {
                                name: name.to_string(),
                            })
                        }
                    };
                    if !literal.is_empty() {
                        segments.push(Segment::Text(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Value(placeholder));
                    // Skip the name and the closing brace.
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::Unbalanced { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(Self { segments })
    }

    /// The text with every placeholder replaced (lists are comma-separated).
    pub fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Text(t) => out.push_str(t),
                Segment::Value(Placeholder::Ids) => out.push_str(&ctx.ids.join(",")),
                Segment::Value(Placeholder::Paths) => out.push_str(&ctx.paths.join(",")),
                Segment::Value(Placeholder::Count) => out.push_str(&ctx.ids.len().to_string()),
                Segment::Value(Placeholder::Resource) => out.push_str(ctx.resource),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str) -> String {
        let ids = vec!["a::0".to_string(), "b".to_string()];
        let paths = vec!["/dev/a".to_string(), "/dev/b".to_string()];
        Template::parse(text).unwrap().render(&Context {
            ids: &ids,
            paths: &paths,
            resource: "nodekit.io/x",
        })
    }

    #[test]
    fn placeholders_are_replaced_and_double_braces_are_literal() {
        assert_eq!(render("{ids}"), "a::0,b");
        assert_eq!(render("n={count} p={paths}"), "n=2 p=/dev/a,/dev/b");
        assert_eq!(render("{{ids}} of {resource}"), "{ids} of nodekit.io/x");
        assert_eq!(render("plain é text"), "plain é text");
        assert_eq!(render(""), "");
    }

    #[test]
    fn unknown_placeholders_and_stray_braces_are_errors() {
        assert_eq!(
            Template::parse("x{idz}").unwrap_err(),
            TemplateError::UnknownPlaceholder { name: "idz".into() }
        );
        assert_eq!(
            Template::parse("{ids").unwrap_err(),
            TemplateError::Unbalanced { at: 0 }
        );
        assert_eq!(
            Template::parse("a}b").unwrap_err(),
            TemplateError::Unbalanced { at: 1 }
        );
    }
}
