"""retrieval.csvread: streaming CSV rows of image URLs, every bad row kept as data."""

import tracemalloc

import pytest

from retrieval.csvread import Row, check_url, clean_url, read_rows
from retrieval.errors import InputError


def write(tmp_path, data, name="data.csv"):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def rows_of(path, **kw):
    return list(read_rows(path, **kw))


# ---------------------------------------------------------------- header detection


@pytest.mark.parametrize("name", ["url", "image_url", "URL", " Image URL ", "imageUrl", "img_url", "link", "src"])
def test_url_column_found_by_name(tmp_path, name):
    p = write(tmp_path, f"id,{name},caption\n1,http://a.example/x.jpg,cat\n")
    rows = read_rows(p)
    assert rows.header == ["id", name, "caption"]
    assert rows.url_column == name.strip()
    [row] = rows
    assert row == Row(2, "http://a.example/x.jpg", {"id": "1", "caption": "cat"}, None)


def test_header_without_known_name_uses_first_column(tmp_path):
    p = write(tmp_path, "address,caption\nhttp://a.example/x.jpg,cat\n")
    rows = read_rows(p)
    assert rows.url_column == "address"
    assert [(r.url, r.meta) for r in rows] == [("http://a.example/x.jpg", {"caption": "cat"})]


def test_no_header(tmp_path):
    p = write(tmp_path, "http://a.example/1.jpg,cat,7\nhttp://a.example/2.jpg,dog,8\n")
    rows = read_rows(p)
    assert rows.header is None
    got = list(rows)
    assert [r.line for r in got] == [1, 2]
    assert got[0] == Row(1, "http://a.example/1.jpg", {"col2": "cat", "col3": "7"}, None)
    assert got[1].meta == {"col2": "dog", "col3": "8"}


def test_no_header_single_column_schemeless_first_row_is_data(tmp_path):
    p = write(tmp_path, "www.example.com/a.jpg\nhttp://a.example/b.jpg\n")
    got = rows_of(p)
    assert len(got) == 2
    assert got[0].error.startswith("invalid-url")
    assert got[1].error is None


def test_explicit_url_column(tmp_path):
    p = write(tmp_path, "thumb,full\nhttp://a.example/t.jpg,http://a.example/f.jpg\n")
    [row] = rows_of(p, url_column="full")
    assert row.url == "http://a.example/f.jpg" and row.meta == {"thumb": "http://a.example/t.jpg"}
    with pytest.raises(InputError, match="no column named 'nope'"):
        read_rows(p, url_column="nope")


def test_duplicate_and_empty_header_names_kept_apart(tmp_path):
    p = write(tmp_path, "url,tag,tag,\nhttp://a.example/x.jpg,a,b,c\n")
    [row] = rows_of(p)
    assert row.meta == {"tag": "a", "tag_2": "b", "col4": "c"}


# ---------------------------------------------------------------- encodings and CSV syntax


def test_bom_and_crlf(tmp_path):
    p = write(tmp_path, b"\xef\xbb\xbfurl,caption\r\nhttp://a.example/x.jpg,cat\r\n\r\nhttp://a.example/y.jpg,dog\r\n")
    rows = read_rows(p)
    assert rows.url_column == "url"  # the BOM is not part of the name
    got = list(rows)
    assert [(r.line, r.url, r.meta["caption"], r.error) for r in got] == [
        (2, "http://a.example/x.jpg", "cat", None), (4, "http://a.example/y.jpg", "dog", None)]


def test_utf16_with_bom(tmp_path):
    p = write(tmp_path, "url\tcaption\r\nhttp://a.example/é.jpg\tchat\r\n".encode("utf-16"))
    [row] = rows_of(p)
    assert row.url == "http://a.example/é.jpg" and row.meta == {"caption": "chat"} and row.error is None


def test_quoted_comma_and_embedded_newline(tmp_path):
    p = write(tmp_path, 'url,caption\n"http://a.example/x.jpg","a cat, sitting"\n'
                        'http://a.example/y.jpg,"two\nlines"\nhttp://a.example/z.jpg,z\n')
    got = rows_of(p)
    assert [r.meta["caption"] for r in got] == ["a cat, sitting", "two\nlines", "z"]
    assert [r.line for r in got] == [2, 3, 5]
    assert all(r.error is None for r in got)


def test_blank_lines_and_empty_rows_skipped(tmp_path):
    p = write(tmp_path, "\n\nurl,caption\n\n   \n,\nhttp://a.example/x.jpg,cat\n\n")
    rows = read_rows(p)
    assert rows.url_column == "url"
    assert [(r.line, r.url) for r in rows] == [(7, "http://a.example/x.jpg")]


def test_invalid_utf8_row_gets_an_error_and_reading_goes_on(tmp_path):
    p = write(tmp_path, b"url,caption\nhttp://a.example/1.jpg,caf\xe9\nhttp://a.example/2.jpg,ok\n")
    got = rows_of(p)
    assert len(got) == 2
    assert got[0].error.startswith("encoding: ") and "0xE9" in got[0].error and "caption" in got[0].error
    assert got[0].meta["caption"] == "caf\ufffd"  # printable and storable: no lone surrogates
    got[0].meta["caption"].encode("utf-8")
    assert got[1].error is None


def test_latin1_file_with_explicit_encoding(tmp_path):
    p = write(tmp_path, b"url,caption\nhttp://a.example/1.jpg,caf\xe9\n")
    [row] = rows_of(p, encoding="latin-1")
    assert row.error is None and row.meta["caption"] == "café"


def test_semicolon_and_tab_delimiters(tmp_path):
    p = write(tmp_path, "url;caption\nhttp://a.example/x.jpg;cat\n", "semi.csv")
    [row] = rows_of(p)
    assert (row.url, row.meta) == ("http://a.example/x.jpg", {"caption": "cat"})
    p = write(tmp_path, "http://a.example/x.jpg\tcat\n", "tab.tsv")
    [row] = rows_of(p)
    assert (row.url, row.meta) == ("http://a.example/x.jpg", {"col2": "cat"})


# ---------------------------------------------------------------- bad rows are data


def test_empty_and_invalid_urls(tmp_path):
    p = write(tmp_path, "url,n\n,1\nftp://a.example/x.jpg,2\nnot a url,3\nhttp://,4\n"
                        "http://a.example/ok.jpg,5\nhttp://a.example:99999/x,6\n")
    got = rows_of(p)
    errors = {r.meta["n"]: r.error for r in got}
    assert errors["1"] == "empty-url"
    assert errors["2"].startswith("invalid-url: scheme 'ftp'")
    assert errors["3"].startswith("invalid-url")
    assert errors["4"] == "invalid-url: no host"
    assert errors["5"] is None
    assert errors["6"] == "invalid-url: bad port"


def test_rows_with_other_field_counts(tmp_path):
    p = write(tmp_path, "id,url,caption\n1,http://a.example/x.jpg\n2,http://a.example/y.jpg,dog,extra\n3\n")
    got = rows_of(p)
    assert got[0] == Row(2, "http://a.example/x.jpg", {"id": "1"}, None)
    assert got[1] == Row(3, "http://a.example/y.jpg", {"id": "2", "caption": "dog", "col4": "extra"}, None)
    assert got[2].error.startswith("malformed-row: 1 field(s), expected 3") and got[2].meta == {"id": "3"}


def test_unclosed_quote_is_a_malformed_row(tmp_path):
    p = write(tmp_path, 'url,caption\nhttp://a.example/x.jpg,"oops\nhttp://a.example/y.jpg,fine\n')
    got = rows_of(p)
    assert len(got) == 1  # the quote swallowed the rest of the file into one caption ...
    assert got[0].url == "http://a.example/x.jpg"
    p = write(tmp_path, '"http://a.example/x.jpg,cat\nhttp://a.example/y.jpg,dog\n', "b.csv")
    [row] = rows_of(p)  # ... or into the URL cell, which is reported
    assert row.error.startswith("malformed-row")


def test_huge_field_does_not_stop_reading(tmp_path):
    p = write(tmp_path, 'url,caption\nhttp://a.example/x.jpg,"' + "x" * 200_000 + '"\nhttp://a.example/y.jpg,ok\n')
    got = rows_of(p)
    assert got[0].error.startswith("malformed-row: field larger than field limit")
    assert got[-1].url == "http://a.example/y.jpg" and got[-1].error is None


def test_unreadable_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_rows(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="is a directory"):
        read_rows(tmp_path)
    with pytest.raises(InputError, match="NUL bytes"):
        read_rows(write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "img.csv"))


def test_empty_file_yields_nothing(tmp_path):
    rows = read_rows(write(tmp_path, ""))
    assert rows.header is None and list(rows) == []


# ---------------------------------------------------------------- URLs


def test_clean_url_encodes_spaces_after_the_host_only():
    assert clean_url("  http://a.example/my photo.jpg?q=a b \n") == "http://a.example/my%20photo.jpg?q=a%20b"
    assert clean_url("\ufeffhttp://a.example/x.jpg\u200b") == "http://a.example/x.jpg"
    assert clean_url("http://a.example/x.jpg") == "http://a.example/x.jpg"


def test_url_with_spaces_in_csv(tmp_path):
    p = write(tmp_path, 'url\n"http://a.example/my cat photo.jpg"\n')
    [row] = rows_of(p)
    assert row.url == "http://a.example/my%20cat%20photo.jpg" and row.error is None


@pytest.mark.parametrize("url", [
    "http://a.example/x.jpg", "https://A.Example:8443/x.jpg?s=1#f", "http://127.0.0.1:8080/x",
    "http://[::1]:8080/x.jpg", "https://例え.jp/画像.jpg", "http://bücher.example/ä ö.png",
    "https://user:pw@a.example/x.jpg",
])
def test_check_url_accepts(url):
    assert check_url(url) is None


@pytest.mark.parametrize("url,start", [
    ("", "empty-url"), ("   ", "empty-url"), ("ftp://a.example/x", "invalid-url: scheme 'ftp'"),
    ("not a url", "invalid-url"), ("http://", "invalid-url: no host"), ("a.example/x.jpg", "invalid-url"),
    ("mailto:a@b.c", "invalid-url"), ("http://a b.example/x", "invalid-url: bad host"),
    ("http://a.example/x\ty", "invalid-url: contains control"), ("http://[::1/x", "invalid-url"),
    ("http://a.example/" + "x" * 9000, "invalid-url: longer than"), ("http://a..b/x", "invalid-url: bad host"),
])
def test_check_url_rejects(url, start):
    assert (check_url(url) or "").startswith(start)


def test_non_ascii_path_and_idn_host_in_csv(tmp_path):
    p = write(tmp_path, "url\nhttps://例え.jp/画像.jpg\nhttp://a.example/Ünïcödé.png\n")
    got = rows_of(p)
    assert [r.error for r in got] == [None, None]
    assert got[0].url == "https://例え.jp/画像.jpg"


# ---------------------------------------------------------------- streaming


def test_large_csv_streams_in_constant_memory(tmp_path):
    n = 200_000
    p = tmp_path / "big.csv"
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write("id,url,caption\n")
        for i in range(n):
            f.write(f"{i},https://img.example.org/photos/{i:07d}.jpg,a picture of thing number {i}\n")
    size = p.stat().st_size
    tracemalloc.start()
    try:
        count = bad = 0
        last = None
        for row in read_rows(p):
            count += 1
            bad += row.error is not None
            last = row
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and bad == 0
    assert last.line == n + 1 and last.meta["id"] == str(n - 1)
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"
    assert peak < 2_000_000


# ---------------------------------------------------------------- issue 10: the URL column by content, UTF-16, binary


def test_url_column_chosen_by_what_its_cells_hold(tmp_path):
    rows = read_rows(write(tmp_path, "id,photo_url\n1,http://a.example/1.jpg\n2,http://a.example/2.jpg\n"))
    assert (rows.url_column, rows.url_column_how) == ("photo_url", "by content")
    assert [(r.url, r.meta, r.error) for r in rows] == [("http://a.example/1.jpg", {"id": "1"}, None),
                                                         ("http://a.example/2.jpg", {"id": "2"}, None)]
    # file names count like URLs; a named column wins a tie; no header: the column of URLs
    rows = read_rows(write(tmp_path, "id,caption,file\n1,a cat,cats/a.jpg\n2,a dog,dog.PNG\n", "f.csv"))
    assert (rows.url_column, rows.url_column_how) == ("file", "by content")
    rows = read_rows(write(tmp_path, "mirror,url\nhttp://m.example/1.jpg,http://a.example/1.jpg\n", "t.csv"))
    assert (rows.url_column, rows.url_column_how) == ("url", "by name")
    rows = read_rows(write(tmp_path, "42,http://a.example/1.jpg,cat\n43,http://a.example/2.jpg,dog\n", "n.csv"))
    assert rows.header is None and (rows.url_column, rows.url_column_how) == ("col2", "by content")
    assert [r.meta for r in rows] == [{"col1": "42", "col3": "cat"}, {"col1": "43", "col3": "dog"}]
    # a column that holds a few URLs among words loses to one that holds URLs in every row
    text = "note,link\n" + "".join(f"see http://x.example/{i},http://a.example/{i}.jpg\n" if i % 10 == 0 else
                                   f"word {i},http://a.example/{i}.jpg\n" for i in range(50))
    assert read_rows(write(tmp_path, text, "m.csv")).url_column == "link"
    # nothing looks like a URL: the named column, else the first; --url-column still wins
    assert read_rows(write(tmp_path, "a,url\nx,y\n", "w.csv")).url_column == "url"
    assert read_rows(write(tmp_path, "id,photo_url\n1,http://a.example/1.jpg\n", "g.csv"), url_column="id").url_column == "id"


def test_utf16_csv_with_bom_without_bom_and_with_bad_code_units(tmp_path):
    text = "id,url,title\n1,http://a.example/é.jpg,café\n2,http://a.example/2.jpg,ok\n"
    for enc, name in (("utf-16", "bom.csv"), ("utf-16-le", "le.csv"), ("utf-16-be", "be.csv"), ("utf-32", "u32.csv")):
        rows = read_rows(write(tmp_path, text.encode(enc), name))
        got = list(rows)
        assert [(r.url, r.meta["title"], r.error) for r in got] == [
            ("http://a.example/é.jpg", "café", None), ("http://a.example/2.jpg", "ok", None)], name
    # a trailing odd byte, a lone surrogate: rows, not a traceback
    bad = text.encode("utf-16") + "3,http://a.example/3.jpg,\n".encode("utf-16-le") + b"\x00\xd8,\x00x\x00\n\x00A"
    got = rows_of(write(tmp_path, bad, "bad.csv"))
    assert [r.url for r in got][:3] == ["http://a.example/é.jpg", "http://a.example/2.jpg", "http://a.example/3.jpg"]


@pytest.mark.parametrize("data,looks", [
    (bytes(range(1, 256)) * 300, "control characters"),  # random-ish bytes without a NUL
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(2000), "a PNG image"),
    (b"\x1f\x8b\x08\x00" + bytes(range(1, 256)) * 10, "a gzip file"),
    (b"PK\x03\x04\x14\x00\x06\x00" + bytes(200), "a ZIP archive"),
])
def test_binary_file_refused_with_one_line_naming_it(tmp_path, data, looks):
    p = write(tmp_path, data, "photos.csv")
    with pytest.raises(InputError) as err:
        read_rows(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: not a text CSV file") and looks in msg and "\n" not in msg, msg


def test_a_text_csv_with_a_few_odd_characters_is_not_binary(tmp_path):
    p = write(tmp_path, "url,title\n" + "".join(f"http://a.example/{i}.jpg,t\x1b[1m{i}\n" if i % 10 == 0 else f"http://a.example/{i}.jpg,t{i}\n"
                                      for i in range(200)))
    assert len(rows_of(p)) == 200
    latin1 = ("url,title\n" + "".join(f"http://a.example/{i}.jpg,été à Noël\n" for i in range(200))).encode("latin-1")
    got = rows_of(write(tmp_path, latin1, "latin1.csv"))
    assert len(got) == 200 and got[0].error.startswith("encoding")
