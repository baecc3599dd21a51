//! The small pages the ingress answers widget and install calls with. Every value
//! that came from the request is escaped: a `DOMAIN` or `PLACEMENT` is attacker input.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Loaded over https: the page is shown inside the portal's https frame, and a
/// protocol-relative URL would follow whatever scheme the page itself was served with.
const BX24_LIBRARY: &str = "https://api.bitrix24.com/api/v1/";

/// Escapes text for a single- or double-quoted JavaScript string literal that sits in
/// an HTML `<script>` element: everything but letters, digits and URL punctuation
/// becomes a `\uXXXX` escape, so no quote, backslash, `<`, `>` or `&` is left for
/// either the JavaScript or the HTML parser to act on.
pub fn js_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || ":/.?=_-~%+,;@!$*()#[]".contains(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        }
    }
    out
}

fn page(lang: &str, title: &str, body: &str, script: &str) -> String {
    let mut html = String::with_capacity(512 + body.len());
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"{}\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <script src=\"{}\"></script></head>\n<body>{}{}</body></html>\n",
        escape(lang),
        escape(title),
        BX24_LIBRARY,
        body,
        script
    );
    html
}

/// The widget page: tells the user the item is being fetched.
pub fn placement_page(lang: &str, placement: &str, item_id: Option<u64>, domain: &str) -> String {
    let item = item_id.map(|id| format!(" #{id}")).unwrap_or_default();
    let body = format!(
        "<p>b24-pipeline received <b>{}</b>{} from {}. The data is being fetched.</p>",
        escape(placement),
        item,
        escape(domain)
    );
    page(lang, "b24-pipeline", &body, "")
}

/// The install page. Before finishing the installation it binds `ONAPPINSTALL` and
/// `ONAPPUPDATE` to `<public_url>/events`: `ONAPPINSTALL`, sent after `installFinish`,
/// is the only message that carries the portal's `application_token`, and Bitrix24
/// removes an application's bindings when it is updated, so every version's installer
/// sets them again. The URL is written as a literal from `PUBLIC_URL`, never derived
/// from the page's own address (which whoever serves or frames the page controls).
pub fn install_page(lang: &str, domain: &str, public_url: &str) -> String {
    let body = format!(
        "<p>b24-pipeline is being installed on {}.</p>",
        escape(domain)
    );
    // js_string leaves no character HTML would act on; escape() is kept as the rule
    // for everything echoed into a page.
    let handler = escape(&js_string(&format!("{public_url}/events")));
    let script = format!(
        "<script>BX24.init(function(){{\
BX24.callBind('ONAPPINSTALL','{handler}',0,function(){{\
BX24.callBind('ONAPPUPDATE','{handler}',0,function(){{\
BX24.installFinish();}});}});}});</script>"
    );
    page(lang, "b24-pipeline installation", &body, &script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            escape(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn pages_echo_nothing_unescaped() {
        let evil = "\"><img src=x onerror=alert(1)>";
        for html in [
            placement_page(evil, evil, Some(5), evil),
            install_page(evil, evil, "https://b24.example.com"),
        ] {
            assert!(!html.contains("<img"), "{html}");
            assert!(!html.contains("\"><img"), "{html}");
            assert!(html.contains("&quot;&gt;&lt;img"), "{html}");
        }
        let install = install_page("en", "a.bitrix24.com", "https://b24.example.com");
        assert!(install.contains("BX24.callBind('ONAPPINSTALL'"));
        assert!(install.contains("BX24.installFinish()"));
    }

    #[test]
    fn install_page_binds_install_and_update_to_public_url_then_finishes() {
        let html = install_page("en", "a.bitrix24.com", "https://b24.example.com/hook");
        let install = html
            .find("BX24.callBind('ONAPPINSTALL','https://b24.example.com/hook/events',0,")
            .expect("ONAPPINSTALL bound to PUBLIC_URL/events");
        let update = html
            .find("BX24.callBind('ONAPPUPDATE','https://b24.example.com/hook/events',0,")
            .expect("ONAPPUPDATE bound to PUBLIC_URL/events");
        let finish = html.find("BX24.installFinish()").expect("finishes");
        assert!(install < update && update < finish, "{html}");
        assert!(
            !html.contains("location"),
            "no address taken from the page: {html}"
        );
        assert!(html.contains("<script src=\"https://api.bitrix24.com/api/v1/\"></script>"));
        assert!(!html.contains("\"//api.bitrix24.com"));
    }

    #[test]
    fn a_hostile_public_url_cannot_leave_its_string_literal() {
        let evil = "https://x/'+alert(1)+'</script><img src=x onerror=alert(2)>&\"\\ é😀";
        assert_eq!(
            js_string(evil),
            "https://x/\\u0027+alert(1)+\\u0027\\u003c/script\\u003e\\u003cimg\\u0020src=x\\u0020onerror=alert(2)\\u003e\\u0026\\u0022\\u005c\\u0020\\u00e9\\ud83d\\ude00"
        );
        let html = install_page("en", "a", evil);
        let script = &html[html.find("<script>BX24.init").expect("inline script")..];
        assert!(
            !script.contains("<img") && !script.contains("alert(1)+'"),
            "{script}"
        );
        assert_eq!(script.matches("</script>").count(), 1, "{script}");
        assert_eq!(escape(&js_string(evil)), js_string(evil));
    }
}
