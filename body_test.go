package main

import (
	"bytes"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestBodyClassFits checks the buffer a request body is held in: exact up
// to minPooledBody, then never more than a quarter above the body, in
// whole allocator pages from 32 KiB on, and each class one capacity.
func TestBodyClassFits(t *testing.T) {
	capOf := map[int]int{}
	last := -1
	for n := 0; n <= maxPooledBody+1; n += 1 + n/97 {
		c, size := bodyClass(n)
		switch {
		case n <= minPooledBody || n > maxPooledBody:
			if c != -1 || size != n {
				t.Fatalf("bodyClass(%d) = %d, %d; want exact", n, c, size)
			}
			continue
		case c < 0 || c >= len(bodyPools):
			t.Fatalf("bodyClass(%d) = class %d, outside the %d pools", n, c, len(bodyPools))
		case size < n || size > n+n/4:
			t.Fatalf("bodyClass(%d) = size %d: not within a quarter above", n, size)
		case size > 32<<10 && size%(8<<10) != 0:
			t.Fatalf("bodyClass(%d) = size %d: not whole 8 KiB pages", n, size)
		case c < last:
			t.Fatalf("bodyClass(%d) = class %d after class %d", n, c, last)
		}
		if was, ok := capOf[c]; ok && was != size {
			t.Fatalf("class %d has sizes %d and %d", c, was, size)
		}
		capOf[c], last = size, c
	}
	for _, n := range []int{4097, 5120, 5121, 50000, 65536, 65537, maxPooledBody} {
		c, size := bodyClass(n)
		t.Logf("%d bytes: class %d, %d bytes", n, c, size)
	}
	if _, size := bodyClass(50000); size != 56<<10 {
		t.Fatalf("a 50 KB body is held in %d bytes, want 56 KiB", size)
	}
}

// TestReadBodyHoldsWhatArrived checks that a small body is held at its own
// size and a pooled one in its class, with the bytes intact either way.
func TestReadBodyHoldsWhatArrived(t *testing.T) {
	for _, n := range []int{0, 512, minPooledBody, 50000} {
		body := strings.Repeat("x", n)
		r := httptest.NewRequest("POST", "/v1/messages", strings.NewReader(body))
		bb, err := readBody(httptest.NewRecorder(), r, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bb.b, []byte(body)) {
			t.Fatalf("%d bytes: body changed", n)
		}
		_, want := bodyClass(n)
		if cap(bb.b) != want {
			t.Fatalf("%d bytes held in a %d-byte buffer, want %d", n, cap(bb.b), want)
		}
		bb.release()
	}
}
