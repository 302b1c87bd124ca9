//! GBNF (llama.cpp's EBNF, also what vLLM's examples of `guided_grammar`
//! use: `root ::= ...`) rewritten as the Lark grammar llguidance compiles,
//! as llguidance's own `gbnf_to_lark` does: the same terminals and
//! operators, rules renamed to Lark's spelling (`root` is `start`), character
//! classes and `.` as regexes. Grammars without `::=` are taken as Lark.

/// Whether `text` is GBNF rather than Lark.
pub(crate) fn is_gbnf(text: &str) -> bool {
    text.contains("::=")
}

/// A GBNF rule name in Lark's spelling: lowercase, `-` as `_`.
fn rule_name(name: &str) -> String {
    if name == "root" {
        return "start".into();
    }
    name.to_ascii_lowercase().replace('-', "_")
}

/// The Lark grammar for a GBNF one; Err says where the text is not GBNF.
pub(crate) fn to_lark(text: &str) -> Result<String, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut rules: Vec<String> = Vec::new();
    let mut i = 0;
    // Every token of a rule goes on that rule's one line, so rules may span
    // lines freely as GBNF allows.
    let push = |rules: &mut Vec<String>, tok: String| match rules.last_mut() {
        Some(r) => {
            r.push(' ');
            r.push_str(&tok);
        }
        None => rules.push(tok),
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                if i >= chars.len() {
                    return Err(format!("unterminated string starting at character {start}"));
                }
                i += 1;
                push(&mut rules, chars[start..i].iter().collect());
            }
            '[' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != ']' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                if i >= chars.len() {
                    return Err(format!("unterminated character class starting at character {start}"));
                }
                i += 1;
                let class: String = chars[start..i].iter().collect();
                push(&mut rules, format!("/{}/", class.replace('/', "\\/")));
            }
            '.' => {
                i += 1;
                push(&mut rules, "/(?s:.)/".into());
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                i += 1;
                push(&mut rules, c.to_string());
            }
            '{' => {
                let start = i;
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(format!("unterminated repetition starting at character {start}"));
                }
                i += 1;
                push(&mut rules, chars[start..i].iter().collect());
            }
            _ if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if chars[j..].starts_with(&[':', ':', '=']) {
                    rules.push(format!("{}:", rule_name(&name)));
                    i = j + 3;
                } else {
                    push(&mut rules, rule_name(&name));
                }
            }
            _ => return Err(format!("unexpected {c:?} at character {i}")),
        }
    }
    Ok(rules.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_terminals_and_operators() {
        let g = r#"
# a SQL-ish statement
root ::= select-stmt
select-stmt ::= "SELECT " column (", " column)* " FROM " table
column ::= "col_1" | "col_2"
table ::= [a-z/]+ digit{1,3}
  | "t" .
digit ::= [0-9]
"#;
        assert!(is_gbnf(g));
        assert_eq!(
            to_lark(g).unwrap(),
            "start: select_stmt\nselect_stmt: \"SELECT \" column ( \", \" column ) * \" FROM \" table\ncolumn: \"col_1\" | \"col_2\"\ntable: /[a-z\\/]/ + digit {1,3} | \"t\" /(?s:.)/\ndigit: /[0-9]/"
        );
        assert!(to_lark("root ::= \"a").unwrap_err().contains("unterminated"));
        assert!(to_lark("root ::= a & b").unwrap_err().contains("'&'"));
        assert!(!is_gbnf("start: \"a\""));
    }
}
